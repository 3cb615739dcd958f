//! 100 MB COPY out and in through the proxy (TLS on both links) is
//! byte-identical to the same COPY made directly.

use crate::common::client::tokio_pg;
use crate::common::pg::PgRole;
use crate::common::pki::Pki;
use crate::common::proxy::{backend_tls, config, TestProxy};
use crate::common::tls_cluster;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pg_tls_proxy::config::SslMode;

const ROWS: i64 = 1_000_000;
/// Each row is "n<TAB>100 chars\n": about 100 MB in all.
const SQL: &str =
    "SELECT g, repeat(md5(g::text), 3) || repeat('x', 4) FROM generate_series(1, 1000000) g";

async fn copy_out(client: &tokio_postgres::Client, query: &str) -> (u64, [u8; 32]) {
    let stream = client
        .copy_out(&format!("COPY ({query}) TO STDOUT"))
        .await
        .expect("copy out");
    futures_util::pin_mut!(stream);
    let mut hasher = Sha::default();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        total += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (total, hasher.finish())
}

/// A tiny order-sensitive digest (FNV-1a, 4 lanes): enough to detect any
/// reordering, loss or corruption without another dependency.
#[derive(Default)]
struct Sha {
    lanes: [u64; 4],
    n: u64,
}

impl Sha {
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            let lane = (self.n % 4) as usize;
            let h = if self.lanes[lane] == 0 {
                0xcbf29ce484222325
            } else {
                self.lanes[lane]
            };
            self.lanes[lane] = (h ^ b as u64).wrapping_mul(0x100000001b3);
            self.n += 1;
        }
    }

    fn finish(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, l) in self.lanes.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_be_bytes());
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_100mb_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &["host all all 127.0.0.1/32 scram-sha-256"],
        vec![PgRole {
            name: "bulk".into(),
            password: Some("pw".into()),
            superuser: true,
        }],
        false,
    );
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    let proxy = TestProxy::start(c).await;
    let opts = "user=bulk password=pw dbname=postgres channel_binding=disable sslmode=require";
    let direct = tokio_pg(
        &format!("host=localhost port={} {opts}", pg.port()),
        &pki.root_cert,
    )
    .await
    .expect("direct");
    let via = tokio_pg(
        &format!("host=localhost port={} {opts}", proxy.port()),
        &pki.root_cert,
    )
    .await
    .expect("through the proxy");

    let (direct_len, direct_hash) = copy_out(&direct, SQL).await;
    let (via_len, via_hash) = copy_out(&via, SQL).await;
    assert!(direct_len > 100_000_000, "{direct_len}");
    assert_eq!(via_len, direct_len);
    assert_eq!(via_hash, direct_hash);

    // COPY in: stream the same bytes into a table through the proxy, then
    // copy them back out directly and compare.
    via.batch_execute("CREATE TABLE t (g bigint, s text)")
        .await
        .expect("create");
    let sink = via.copy_in("COPY t FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    let source = direct
        .copy_out(&format!("COPY ({SQL}) TO STDOUT"))
        .await
        .expect("source");
    futures_util::pin_mut!(source);
    while let Some(chunk) = source.next().await {
        let chunk: Bytes = chunk.expect("chunk");
        sink.send(chunk).await.expect("send");
    }
    let rows = sink.finish().await.expect("finish");
    assert_eq!(rows, ROWS as u64);
    let (back_len, back_hash) = copy_out(&direct, "SELECT * FROM t ORDER BY g").await;
    assert_eq!(back_len, direct_len);
    assert_eq!(back_hash, direct_hash);
}
