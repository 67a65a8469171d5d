"""Rent a machine from sgl's Machines API with the official x402 Python
client (PyPI x402 2.25.0).

Usage: x402_machines_pay.py BASE_URL PROVISION_JSON

1. POST BASE_URL/compute/provision unpaid: 402 with the x402 v1 body and
   the v2 PAYMENT-REQUIRED header;
2. pays it through the SDK's own httpx transport (x402 v2) and checks the
   order is active with an address and the PAYMENT-RESPONSE header;
3. pays a second order with a v1 payment built from the 402 body
   (X-PAYMENT), then replays it: refused.
Prints the two order ids, one a line, last. Exits non-zero on the first
failed check.
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


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}", file=sys.stderr)


async def main(base: str, order: dict) -> None:
    account = Account.from_key(KEY)
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)
    url = f"{base}/compute/provision"
    ids = []

    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(url, json=order)
        check(r.status_code == 402, f"unpaid provision answered 402 ({r.status_code})")
        check(r.json().get("x402Version") == 1, "402 body is x402 v1")
        check("payment-required" in r.headers, "v2 PAYMENT-REQUIRED header")

    async with x402HttpxClient(client, timeout=60) as http:
        r = await http.post(url, json=order)
        check(r.status_code == 200, f"v2 transport paid ({r.status_code} {r.text[:300]})")
        receipt = json.loads(base64.b64decode(r.headers["payment-response"]))
        check(receipt["success"] is True, "PAYMENT-RESPONSE success")
        o = r.json()["order"]
        check(o["status"] == "active" and o["ip_address"], "order active with an address")
        check("password" not in json.dumps(r.json()).lower().replace("password_available", ""),
              "no password in the answer")
        ids.append(o["id"])

    http_client = x402HTTPClient(client)
    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(url, json=order)
        required = http_client.get_payment_required_response(lambda _name: None, r.json())
        check(required.x402_version == 1, "SDK read the v1 body")
        payload = await http_client.create_payment_payload(required)
        headers = http_client.encode_payment_signature_header(payload)
        r = await plain.post(url, json=order, headers=headers)
        check(r.status_code == 200, f"v1 payment accepted ({r.status_code} {r.text[:300]})")
        ids.append(r.json()["order"]["id"])
        r = await plain.post(url, json=order, headers=headers)
        check(r.status_code == 402, "v1 replay refused")

    for i in ids:
        print(i)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/"), json.loads(sys.argv[2])))
