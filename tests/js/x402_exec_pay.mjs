// The official x402 TypeScript client (npm @x402/fetch and @x402/evm 2.27.0,
// with viem) runs a Node.js program on sgl's code-execution API.
//
// Usage: node x402_exec_pay.mjs BASE_URL
// (run from a directory where @x402/fetch, @x402/evm and viem are installed).
//
// Checks that the 402 the client saw carries the x402 v2 PAYMENT-REQUIRED
// header with extensions.bazaar (the same object as the body), that the
// client paid with PAYMENT-SIGNATURE (x402 v2), and that the answer carries
// PAYMENT-RESPONSE and the program's output. Prints `payer=<address>`, then
// the 200 body as JSON on the last line. Exits non-zero on the first failed
// check.
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from '@x402/fetch'
import { ExactEvmScheme } from '@x402/evm'
import { privateKeyToAccount } from 'viem/accounts'

const KEY =
  process.env.SGL_TEST_PAYER_KEY ??
  '0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d'

function check(cond, what) {
  if (!cond) {
    console.error(`FAIL: ${what}`)
    process.exit(1)
  }
  console.error(`ok: ${what}`)
}

const base = process.argv[2].replace(/\/+$/, '')
const account = privateKeyToAccount(KEY)
console.log(`payer=${account.address.toLowerCase()}`)

// Every exchange the client makes: its payment headers and the answer's.
const seen = []
async function recordingFetch(input, init) {
  const req = new Request(input, init)
  const r = await fetch(req)
  seen.push({
    signature: req.headers.get('payment-signature'),
    xPayment: req.headers.get('x-payment'),
    status: r.status,
    required: r.headers.get('payment-required'),
    body: r.status === 402 ? await r.clone().json() : null,
  })
  return r
}

const payingFetch = wrapFetchWithPaymentFromConfig(recordingFetch, {
  schemes: [{ network: 'eip155:*', client: new ExactEvmScheme(account) }],
})

const program = [
  "const fs = require('fs')",
  "fs.writeFileSync('out.txt', String(6 * 7))",
  "console.log('node says', 1 + 1)",
].join('\n')
const r = await payingFetch(`${base}/api/x402/compute`, {
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify({ stack: 'node', code: program }),
})
const text = await r.text()
check(r.status === 200, `paid (${r.status} ${text.slice(0, 300)})`)
check(seen.length === 2, `one 402, one paid retry (${seen.length} requests)`)
const [first, paid] = seen
check(first.status === 402 && !first.signature, 'the first request carried no payment and got 402')
check(first.required !== null, 'the 402 carried PAYMENT-REQUIRED')
const required = JSON.parse(Buffer.from(first.required, 'base64').toString('utf8'))
check(required.x402Version === 2, 'x402 v2')
check(JSON.stringify(required) === JSON.stringify(first.body), 'the body is the PAYMENT-REQUIRED object')
const bazaar = required.extensions?.bazaar
check(bazaar?.info?.input?.type === 'http' && bazaar.info.input.method === 'POST', 'bazaar input')
check(bazaar?.info?.output?.example !== undefined, 'bazaar output example')
check(bazaar?.schema?.properties?.input !== undefined, 'bazaar schema')
check(paid.signature !== null && paid.xPayment === null, 'paid with PAYMENT-SIGNATURE (x402 v2)')
const receiptHeader = r.headers.get('payment-response')
check(receiptHeader !== null, 'PAYMENT-RESPONSE present')
const receipt = decodePaymentResponseHeader(receiptHeader)
check(receipt.success === true, 'PAYMENT-RESPONSE success')
const out = JSON.parse(text)
check(out.stdout === 'node says 2\n', `stdout ${JSON.stringify(out.stdout)}`)
check(out.exit_code === 0 && out.stack === 'node', 'exit code 0 on node')
check(Buffer.from(out.files['out.txt'] ?? '', 'base64').toString() === '42', 'the written file came back')
console.log(JSON.stringify(out))
