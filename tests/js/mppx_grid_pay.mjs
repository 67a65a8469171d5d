// The official MPP TypeScript client (npm mppx 0.11.0, with viem) pays an sgl
// coordinator through MPP, not x402: a plain chat completion and a credits
// top-up.
//
// Usage: node mppx_grid_pay.mjs BASE_URL MODEL
// (run from a directory where `mppx` and `viem` are installed).
//
// For each paid request it checks that the client answered the
// `WWW-Authenticate: Payment` challenge (it sent `Authorization: Payment`,
// never an x402 header), that the answer carries `Payment-Receipt` and no
// x402 settlement header, and that the same credential presented again is
// refused. Prints `payer=<address>`. Exits non-zero on the first failed check.
import { Mppx, evm } from 'mppx/client'
import { privateKeyToAccount } from 'viem/accounts'

const KEY =
  process.env.SGL_TEST_PAYER_KEY ??
  '0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d'

function check(cond, what) {
  if (!cond) {
    console.error(`FAIL: ${what}`)
    process.exit(1)
  }
  console.log(`ok: ${what}`)
}

const [base, model] = process.argv.slice(2).map((s) => s.replace(/\/+$/, ''))
const account = privateKeyToAccount(KEY)
console.log(`payer=${account.address.toLowerCase()}`)

// Every request the client makes, with its payment headers.
let sent = []
async function recordingFetch(input, init) {
  const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined))
  const seen = {}
  for (const name of ['authorization', 'payment-signature', 'x-payment']) {
    if (headers.has(name)) seen[name] = headers.get(name)
  }
  sent.push(seen)
  return fetch(input, init)
}

const mppx = Mppx.create({
  methods: [evm.charge({ account, currencies: [evm.assets.base.USDC] })],
  fetch: recordingFetch,
  polyfill: false,
})

async function paidByMpp(url, body, what) {
  sent = []
  const r = await mppx.fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  })
  const text = await r.text()
  check(r.status === 200, `${what}: paid (${r.status} ${text.slice(0, 300)})`)
  check(sent.length === 2, `${what}: one 402, one paid retry (${sent.length} requests)`)
  check(Object.keys(sent[0]).length === 0, `${what}: the first request carried no payment`)
  const paid = sent[1]
  check(
    Object.keys(paid).length === 1 && (paid.authorization ?? '').startsWith('Payment '),
    `${what}: the client paid with Authorization: Payment (MPP), not x402 (${Object.keys(paid)})`,
  )
  const receipt = r.headers.get('payment-receipt')
  check(receipt !== null, `${what}: Payment-Receipt present`)
  const decoded = JSON.parse(Buffer.from(receipt, 'base64url').toString('utf8'))
  check(decoded.status === 'success' && decoded.method === 'evm', `${what}: receipt content`)
  check(
    !r.headers.has('payment-response') && !r.headers.has('x-payment-response'),
    `${what}: no x402 settlement header`,
  )
  return { credential: paid.authorization, body: JSON.parse(text) }
}

const chatUrl = `${base}/v1/chat/completions`
const chat = { model, max_tokens: 16, messages: [{ role: 'user', content: 'paid through mppx' }] }
const c = await paidByMpp(chatUrl, chat, 'chat')
const answer = c.body.choices[0].message.content
check(answer === 'paid through mppx', `chat answer ${JSON.stringify(answer)}`)

const topupUrl = `${base}/compute/credits/topup`
const t = await paidByMpp(topupUrl, { amount: '1' }, 'top-up')
check(t.body.deposited_micros === 1000000, `top-up deposited $1 (${JSON.stringify(t.body)})`)
check(t.body.wallet === account.address.toLowerCase(), 'credits went to the paying wallet')

// Each credential again, by hand: refused.
for (const [url, body, cred, what] of [
  [chatUrl, chat, c.credential, 'chat'],
  [topupUrl, { amount: '1' }, t.credential, 'top-up'],
]) {
  const r = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: cred },
    body: JSON.stringify(body),
  })
  await r.text()
  check(r.status === 402, `${what} credential replay refused (${r.status})`)
  check(!r.headers.has('payment-receipt'), `${what}: no receipt for the replay`)
}
console.log('mppx grid payment: all checks passed')
