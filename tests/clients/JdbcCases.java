// pgjdbc (Debian's libpostgresql-jdbc-java, Java's own TLS) through pg-tls-proxy.
//
//   javac -cp /usr/share/java/postgresql.jar -d OUT JdbcCases.java
//   java -cp /usr/share/java/postgresql.jar:OUT JdbcCases CASE
//   CASE: tls-login direct-tls mtls refused-cert cancel copy
//
// Connection parameters come from PGT_* environment variables (see run.sh).
// Prints "ok", "FAIL <reason>" or "skip <reason>" first, then "note: ..." lines.

import java.io.IOException;
import java.io.StringReader;
import java.io.StringWriter;
import java.net.Socket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Base64;
import java.util.Properties;
import javax.net.ssl.SSLSocket;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PSQLException;

public class JdbcCases {
  static final String CLIENT = "jdbc";

  static String env(String k) {
    String v = System.getenv(k);
    if (v == null) throw new IllegalStateException("missing " + k);
    return v;
  }

  /**
   * pgjdbc's default LibPQFactory (sslmode, sslrootcert, sslcert, sslkey as
   * libpq), keeping the socket it made so the case can read the TLS session.
   */
  public static class RecordingFactory extends org.postgresql.ssl.LibPQFactory {
    static volatile SSLSocket last;

    public RecordingFactory(Properties info) throws PSQLException {
      super(info);
    }

    @Override
    public Socket createSocket(Socket s, String host, int port, boolean autoClose) throws IOException {
      Socket r = super.createSocket(s, host, port, autoClose);
      if (r instanceof SSLSocket) last = (SSLSocket) r;
      return r;
    }
  }

  static Properties props(String user) {
    Properties p = new Properties();
    p.setProperty("user", user);
    p.setProperty("sslmode", "verify-full");
    p.setProperty("sslrootcert", env("PGT_CA"));
    p.setProperty("sslfactory", RecordingFactory.class.getName());
    p.setProperty("connectTimeout", "10");
    return p;
  }

  static Properties appProps() {
    Properties p = props(env("PGT_USER"));
    p.setProperty("password", env("PGT_PASSWORD"));
    return p;
  }

  /** pgjdbc reads sslkey as PKCS#8 DER; dev-certs writes PKCS#8 PEM. */
  static String derKey(String pemPath, String name) throws IOException {
    String pem = Files.readString(Path.of(pemPath));
    String b64 = pem.replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
    Path out = Path.of(env("PGT_TMP"), name + ".pk8");
    Files.write(out, Base64.getDecoder().decode(b64));
    return out.toString();
  }

  static Properties certProps(String cert, String key, String name) throws IOException {
    Properties p = props(env("PGT_CERT_USER"));
    p.setProperty("sslcert", cert);
    p.setProperty("sslkey", derKey(key, name));
    return p;
  }

  static Connection connect(Properties p) throws SQLException {
    String url = "jdbc:postgresql://" + env("PGT_HOST") + ":" + env("PGT_PORT") + "/" + env("PGT_DB");
    return DriverManager.getConnection(url, p);
  }

  static String tls() {
    SSLSocket s = RecordingFactory.last;
    if (s == null) return null;
    return s.getSession().getProtocol() + " " + s.getSession().getCipherSuite();
  }

  static Object one(Connection c, String sql) throws SQLException {
    try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
      rs.next();
      return rs.getObject(1);
    }
  }

  static String oneLine(Object o) {
    return String.valueOf(o).replaceAll("\\s+", " ").trim();
  }

  static String login(boolean direct) throws Exception {
    Properties p = appProps();
    if (direct) {
      try {
        org.postgresql.PGProperty.valueOf("SSL_NEGOTIATION");
      } catch (IllegalArgumentException e) {
        return "skip pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION
            + " has no sslNegotiation=direct (pgjdbc 42.7.4+)";
      }
      p.setProperty("sslNegotiation", "direct");
    }
    try (Connection c = connect(p)) {
      String t = tls();
      if (t == null) return "FAIL connected without TLS";
      Object v = one(c, "SELECT 1");
      if (!Integer.valueOf(1).equals(v)) return "FAIL SELECT 1 returned " + v;
      Object real = one(c, "SELECT pg_backend_pid()");
      int seen = c.unwrap(PGConnection.class).getBackendPID();
      if (!Integer.valueOf(seen).equals(real)) return "FAIL getBackendPID() " + seen + " is not pg_backend_pid() " + real;
      System.out.println("ok");
      System.out.println("note: pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION + ", java "
          + System.getProperty("java.version") + ", " + t);
      System.out.println("note: getBackendPID() " + c.unwrap(PGConnection.class).getBackendPID()
          + ", pg_backend_pid() " + one(c, "SELECT pg_backend_pid()"));
    }
    return null;
  }

  static String mtls() throws Exception {
    try (Connection c = connect(certProps(env("PGT_CERT"), env("PGT_KEY"), "jdbc-good"))) {
      Object who = one(c, "SELECT current_user");
      if (!env("PGT_CERT_USER").equals(who)) return "FAIL current_user is " + who;
      if (tls() == null) return "FAIL connected without TLS";
    }
    System.out.println("ok");
    return null;
  }

  static String refusedCert() throws Exception {
    try (Connection c = connect(certProps(env("PGT_BAD_CERT"), env("PGT_BAD_KEY"), "jdbc-bad"))) {
      one(c, "SELECT 1");
      return "FAIL logged in with a certificate from a foreign CA";
    } catch (SQLException e) {
      Throwable cause = e.getCause();
      System.out.println("ok");
      System.out.println("note: error: " + e.getSQLState() + ": " + oneLine(e.getMessage())
          + (cause != null ? " (cause: " + cause.getClass().getSimpleName() + ": " + oneLine(cause.getMessage()) + ")" : ""));
      return null;
    }
  }

  /**
   * Until the backend {@code pid} runs a query (pg_stat_activity, from a
   * second connection), for at most 10 s: a cancel sent before the query
   * started would hit an idle backend and prove nothing.
   */
  static boolean waitActive(int pid) throws SQLException, InterruptedException {
    try (Connection w = connect(appProps());
        java.sql.PreparedStatement ps = w.prepareStatement("SELECT state FROM pg_stat_activity WHERE pid = ?")) {
      ps.setInt(1, pid);
      long deadline = System.nanoTime() + 10_000_000_000L;
      while (System.nanoTime() < deadline) {
        try (ResultSet rs = ps.executeQuery()) {
          if (rs.next() && "active".equals(rs.getString(1))) return true;
        }
        Thread.sleep(50);
      }
      return false;
    }
  }

  static String cancel() throws Exception {
    // Statement.cancel(): pgjdbc opens a new connection and sends the
    // CancelRequest there (in plaintext in 42.5: no SSLRequest).
    try (Connection c = connect(appProps()); Statement st = c.createStatement()) {
      int pid = c.unwrap(PGConnection.class).getBackendPID();
      final long[] sentAt = {0};
      Thread canceller = new Thread(() -> {
        try {
          if (waitActive(pid)) {
            sentAt[0] = System.nanoTime();
            st.cancel();
          }
        } catch (SQLException | InterruptedException e) {
          System.err.println("cancel: " + e);
        }
      });
      canceller.setDaemon(true);
      canceller.start();
      try {
        st.execute("SELECT pg_sleep(30)");
        return "FAIL pg_sleep(30) finished without being cancelled";
      } catch (SQLException e) {
        canceller.join(15_000);
        double elapsed = (System.nanoTime() - sentAt[0]) / 1e9;
        if (!"57014".equals(e.getSQLState()) || sentAt[0] == 0 || elapsed > 10) {
          return String.format("FAIL %s %.1f s after the cancel: %s", e.getSQLState(), elapsed, oneLine(e.getMessage()));
        }
        one(c, "SELECT 1"); // the session goes on
        System.out.println("ok");
        System.out.println(String.format("note: Statement.cancel(), 57014 %.1f s after it: %s", elapsed, oneLine(e.getMessage())));
        return null;
      }
    }
  }

  static String copy() throws Exception {
    int n = Integer.parseInt(env("PGT_COPY_ROWS"));
    StringBuilder in = new StringBuilder();
    StringBuilder expected = new StringBuilder();
    for (int i = 1; i <= n; i++) {
      String row = i + "\t" + String.format("%06d-%080d", i, i) + "\n";
      in.append(CLIENT).append('\t').append(row);
      expected.append(row);
    }
    try (Connection c = connect(appProps())) {
      CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
      long written = cm.copyIn("COPY copy_rows (client, n, payload) FROM STDIN", new StringReader(in.toString()));
      if (written != n) return "FAIL COPY FROM reported " + written + " rows";
      StringWriter out = new StringWriter();
      long read = cm.copyOut("COPY (SELECT n, payload FROM copy_rows WHERE client = '" + CLIENT + "' ORDER BY n) TO STDOUT", out);
      if (read != n || !out.toString().equals(expected.toString())) {
        return "FAIL COPY TO returned " + read + " rows, not the " + n + " written";
      }
    }
    System.out.println("ok");
    System.out.println("note: " + n + " rows in (CopyManager.copyIn) and out (copyOut), identical");
    return null;
  }

  public static void main(String[] args) {
    String name = args.length > 0 ? args[0] : "";
    String result;
    try {
      switch (name) {
        case "tls-login": result = login(false); break;
        case "direct-tls": result = login(true); break;
        case "mtls": result = mtls(); break;
        case "refused-cert": result = refusedCert(); break;
        case "cancel": result = cancel(); break;
        case "copy": result = copy(); break;
        default: result = "FAIL unknown case " + name;
      }
    } catch (Exception e) {
      result = "FAIL " + e.getClass().getSimpleName() + ": " + oneLine(e.getMessage());
    }
    if (result != null) System.out.println(result);
    System.out.flush();
    System.exit(result != null && result.startsWith("FAIL") ? 1 : 0);
  }
}
