"""Pay an sgl server with the official x402 Python client (PyPI x402 2.25.0).

Usage: x402_pay.py BASE_URL

Against BASE_URL/paid/echo (a resource priced at one cent) this:
  1. pays through the SDK's own httpx transport (x402 v2: the client reads
     the PAYMENT-REQUIRED header) and checks the PAYMENT-RESPONSE header;
  2. builds a v2 payment with the SDK, pays once, then replays it: refused;
  3. builds a v1 payment from the 402 JSON body (X-PAYMENT), pays, replays:
     refused, and checks X-PAYMENT-RESPONSE;
  4. tops up $1 of credits at BASE_URL/compute/credits/topup with v2.
Spend controls are off (the asset is configuration of the test server).
Exits non-zero on the first failed check.
"""

import asyncio
import base64
import json
import os
import sys

import httpx
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client

KEY = os.environ.get(
    "SGL_TEST_PAYER_KEY",
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
)


def b64json(value: str) -> dict:
    return json.loads(base64.b64decode(value))


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


async def main(base: str) -> None:
    account = Account.from_key(KEY)
    payer = account.address.lower()
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)
    url = f"{base}/paid/echo"

    # 1. The SDK's transport pays the 402 by itself.
    async with x402HttpxClient(client, timeout=30) as http:
        r = await http.post(url, json={"hi": "transport"})
        check(r.status_code == 200, f"v2 transport paid ({r.status_code} {r.text[:200]})")
        settle = b64json(r.headers["payment-response"])
        check(settle["success"] is True, "PAYMENT-RESPONSE success")
        check(r.json()["paid_by"] == payer, "paid by the SDK's account")

    http_client = x402HTTPClient(client)
    async with httpx.AsyncClient(timeout=30) as plain:
        # 2. v2, built by the SDK, then replayed.
        r = await plain.post(url, json={"hi": "v2"})
        check(r.status_code == 402, "unpaid request answered 402")
        required = http_client.get_payment_required_response(r.headers.get, r.json())
        check(required.x402_version == 2, "SDK read the v2 PAYMENT-REQUIRED header")
        payload = await http_client.create_payment_payload(required)
        headers = http_client.encode_payment_signature_header(payload)
        check("PAYMENT-SIGNATURE" in headers, "SDK built PAYMENT-SIGNATURE")
        r = await plain.post(url, json={"hi": "v2"}, headers=headers)
        check(r.status_code == 200, f"v2 payment accepted ({r.status_code} {r.text[:200]})")
        r = await plain.post(url, json={"hi": "v2"}, headers=headers)
        check(r.status_code == 402, "v2 replay refused")
        reason = b64json(r.headers["payment-required"]).get("error")
        check(reason == "invalid_exact_evm_nonce_already_used", f"v2 replay reason {reason}")

        # 3. v1 from the JSON body alone.
        r = await plain.post(url, json={"hi": "v1"})
        body = r.json()
        check(body.get("x402Version") == 1, "402 body is x402 v1")
        required = http_client.get_payment_required_response(lambda _name: None, body)
        check(required.x402_version == 1, "SDK read the v1 body")
        payload = await http_client.create_payment_payload(required)
        headers = http_client.encode_payment_signature_header(payload)
        check("X-PAYMENT" in headers, "SDK built X-PAYMENT")
        r = await plain.post(url, json={"hi": "v1"}, headers=headers)
        check(r.status_code == 200, f"v1 payment accepted ({r.status_code} {r.text[:200]})")
        settle = b64json(r.headers["x-payment-response"])
        check(settle["success"] is True and settle["network"] == "base", "X-PAYMENT-RESPONSE")
        r = await plain.post(url, json={"hi": "v1"}, headers=headers)
        check(r.status_code == 402, "v1 replay refused")

    # 4. Credits top-up, paid by the SDK's transport.
    async with x402HttpxClient(client, timeout=30) as http:
        r = await http.post(f"{base}/compute/credits/topup", json={"amount": 1, "network": "base"})
        check(r.status_code == 200, f"top-up paid ({r.status_code} {r.text[:200]})")
        check(r.json()["deposited_micros"] == 1_000_000, "top-up credited exactly $1")
    print("x402 client: all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/")))
