"""The official x402 Python client (PyPI x402 2.25.0) pays an sgl
coordinator's 402 for a plain chat completion and gets the answer.

Usage: x402_grid_pay.py BASE_URL MODEL

1. v2 through the SDK's own httpx transport (PAYMENT-REQUIRED header);
2. v1 built from the 402 JSON body (X-PAYMENT), then replayed: refused.
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


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


async def main(base: str, model: str) -> None:
    account = Account.from_key(KEY)
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)
    url = f"{base}/v1/chat/completions"

    def body(text: str) -> dict:
        return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}

    async with x402HttpxClient(client, timeout=60) as http:
        r = await http.post(url, json=body("paid by the x402 transport"))
        check(r.status_code == 200, f"v2 transport paid ({r.status_code} {r.text[:200]})")
        receipt = json.loads(base64.b64decode(r.headers["payment-response"]))
        check(receipt["success"] is True, "PAYMENT-RESPONSE success")
        answer = r.json()["choices"][0]["message"]["content"]
        check(answer == "paid by the x402 transport", f"answer {answer!r}")

    http_client = x402HTTPClient(client)
    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(url, json=body("paid with x402 v1"))
        check(r.status_code == 402 and r.json().get("x402Version") == 1, "402 body is x402 v1")
        required = http_client.get_payment_required_response(lambda _name: None, r.json())
        payload = await http_client.create_payment_payload(required)
        headers = http_client.encode_payment_signature_header(payload)
        check("X-PAYMENT" in headers, "SDK built X-PAYMENT")
        r = await plain.post(url, json=body("paid with x402 v1"), headers=headers)
        check(r.status_code == 200, f"v1 payment accepted ({r.status_code} {r.text[:200]})")
        check("x-payment-response" in r.headers, "X-PAYMENT-RESPONSE")
        r = await plain.post(url, json=body("paid with x402 v1"), headers=headers)
        check(r.status_code == 402, "v1 replay refused")
    print("x402 grid payment: all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/"), sys.argv[2]))
