// node-postgres (`pg`, pure JavaScript, Node's TLS) through pg-tls-proxy.
//
//   NODE_PATH=.../node_modules node node_cases.js CASE
//   CASE: tls-login direct-tls mtls refused-cert cancel copy
//
// Connection parameters come from PGT_* environment variables (see run.sh).
// Prints "ok", "FAIL <reason>" or "skip <reason>" first, then "note: ..." lines.
'use strict'

const fs = require('fs')
const { pipeline } = require('stream/promises')
const { Readable } = require('stream')
const pg = require('pg')
const copyStreams = require('pg-copy-streams')

const E = process.env
const CLIENT = 'node'
const oneLine = (s) => String(s).split(/\s+/).join(' ').trim()

// ssl as an object: Node verifies the chain against `ca` and the host name
// (rejectUnauthorized defaults to true): libpq's verify-full.
function config({ user = E.PGT_USER, password = E.PGT_PASSWORD, cert, key, direct = false } = {}) {
  const ssl = { ca: fs.readFileSync(E.PGT_CA) }
  if (cert) {
    ssl.cert = fs.readFileSync(cert)
    ssl.key = fs.readFileSync(key)
  }
  return {
    host: E.PGT_HOST,
    port: Number(E.PGT_PORT),
    database: E.PGT_DB,
    user,
    password,
    ssl,
    sslnegotiation: direct ? 'direct' : 'postgres',
    connectionTimeoutMillis: 10000,
  }
}

function pgVersion() {
  try {
    return JSON.parse(fs.readFileSync(require.resolve('pg').replace(/lib[/\\]index\.js$/, 'package.json'))).version
  } catch (e) {
    return '?'
  }
}

function tlsOf(client) {
  const s = client.connection.stream
  if (!s.encrypted) return null
  return `${s.getProtocol()} ${s.getCipher().standardName} alpn=${s.alpnProtocol || '-'}`
}

// Until the backend `pid` runs a query (pg_stat_activity, from a second
// connection), for at most 10 s.
async function waitActive(pid) {
  const watcher = new pg.Client(config())
  await watcher.connect()
  try {
    const deadline = Date.now() + 10000
    while (Date.now() < deadline) {
      const { rows } = await watcher.query('SELECT state FROM pg_stat_activity WHERE pid = $1', [pid])
      if (rows.length && rows[0].state === 'active') return true
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    return false
  } finally {
    await watcher.end()
  }
}

async function login(direct) {
  const client = new pg.Client(config({ direct }))
  await client.connect()
  try {
    const tls = tlsOf(client)
    if (!tls) return 'FAIL connected without TLS'
    const { rows } = await client.query('SELECT 1 AS one, pg_backend_pid() AS pid')
    if (rows[0].one !== 1) return `FAIL SELECT 1 returned ${rows[0].one}`
    if (client.processID !== rows[0].pid) return `FAIL processID ${client.processID} is not pg_backend_pid() ${rows[0].pid}`
    console.log('ok')
    console.log(`note: pg ${pgVersion()}, node ${process.version}, sslnegotiation=${direct ? 'direct' : 'postgres'}, ${tls}`)
    console.log(`note: processID ${client.processID}, pg_backend_pid() ${rows[0].pid}`)
  } finally {
    await client.end()
  }
}

const cases = {
  'tls-login': () => login(false),
  'direct-tls': () => login(true),

  async mtls() {
    const client = new pg.Client(config({ user: E.PGT_CERT_USER, password: undefined, cert: E.PGT_CERT, key: E.PGT_KEY }))
    await client.connect()
    try {
      const { rows } = await client.query('SELECT current_user AS u')
      if (rows[0].u !== E.PGT_CERT_USER) return `FAIL current_user is ${rows[0].u}`
      if (!tlsOf(client)) return 'FAIL connected without TLS'
    } finally {
      await client.end()
    }
    console.log('ok')
  },

  async 'refused-cert'() {
    const client = new pg.Client(config({ user: E.PGT_CERT_USER, password: undefined, cert: E.PGT_BAD_CERT, key: E.PGT_BAD_KEY }))
    client.on('error', () => {}) // a late socket error must not crash the process
    try {
      await client.connect()
    } catch (e) {
      console.log('ok')
      console.log(`note: error: ${e.code ? e.code + ': ' : ''}${oneLine(e.message)}`)
      return
    }
    await client.end()
    return 'FAIL logged in with a certificate from a foreign CA'
  },

  async cancel() {
    // node-postgres' cancel: a second Client's cancel(client, query) opens a
    // new connection and sends the CancelRequest (in plaintext: it does not
    // send SSLRequest first, even with ssl configured).
    const client = new pg.Client(config())
    await client.connect()
    try {
      const query = client.query(new pg.Query('SELECT pg_sleep(30)'))
      const done = new Promise((resolve) => {
        query.on('error', (e) => resolve(e))
        query.on('end', () => resolve(null))
      })
      // Cancel only once the server runs the query (read from a second
      // connection): a CancelRequest that came before it would hit an idle
      // backend and prove nothing.
      if (!(await waitActive(client.processID))) {
        return 'FAIL pg_sleep(30) never showed as active'
      }
      const start = Date.now()
      new pg.Client(config()).cancel(client, query)
      const err = await done
      const elapsed = (Date.now() - start) / 1000
      if (!err) return 'FAIL pg_sleep(30) finished without being cancelled'
      if (err.code !== '57014' || elapsed > 10) return `FAIL ${err.code} ${elapsed.toFixed(1)} s after the cancel: ${oneLine(err.message)}`
      await client.query('SELECT 1') // the session goes on
      console.log('ok')
      console.log(`note: new Client().cancel(client, query), 57014 ${elapsed.toFixed(1)} s after it: ${oneLine(err.message)}`)
    } finally {
      await client.end()
    }
  },

  async copy() {
    // pg itself has no COPY API: pg-copy-streams (same maintainers' ecosystem).
    const n = Number(E.PGT_COPY_ROWS)
    const expected = []
    for (let i = 1; i <= n; i++) expected.push(`${i}\t${String(i).padStart(6, '0')}-${String(i).padStart(80, '0')}`)
    const client = new pg.Client(config())
    await client.connect()
    let got
    try {
      const lines = expected.map((l) => `${CLIENT}\t${l}\n`)
      await pipeline(Readable.from(lines), client.query(copyStreams.from('COPY copy_rows (client, n, payload) FROM STDIN')))
      const chunks = []
      const out = client.query(copyStreams.to(`COPY (SELECT n, payload FROM copy_rows WHERE client = '${CLIENT}' ORDER BY n) TO STDOUT`))
      for await (const chunk of out) chunks.push(chunk)
      got = Buffer.concat(chunks).toString().split('\n').filter((l) => l !== '')
    } finally {
      await client.end()
    }
    if (got.length !== n || got.some((l, i) => l !== expected[i])) return `FAIL COPY TO returned ${got.length} rows, not the ${n} written`
    console.log('ok')
    console.log(`note: ${n} rows in (COPY FROM STDIN) and out (COPY TO STDOUT), identical`)
  },
}

async function main() {
  const name = process.argv[2]
  const fn = cases[name]
  let result
  if (!fn) result = `FAIL unknown case ${name}`
  else {
    try {
      result = await fn()
    } catch (e) {
      result = `FAIL ${e.code ? e.code + ': ' : ''}${oneLine(e.message)}`
    }
  }
  if (result) console.log(result)
  // Exit now: a socket the library left open must not keep the case alive.
  process.exit(result && result.startsWith('FAIL') ? 1 : 0)
}

main()
