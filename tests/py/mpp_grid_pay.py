"""The official MPP Python client (PyPI pympp 0.16.0) pays an sgl coordinator
through MPP, not x402: a plain chat completion and a credits top-up.

Usage: mpp_grid_pay.py BASE_URL MODEL

For each paid request the script checks that the client answered the
`WWW-Authenticate: Payment` challenge (it sent `Authorization: Payment`, never
an x402 header), that the answer carries `Payment-Receipt` and no x402
settlement header, and that the same credential presented again is refused.
Prints `payer=<address>` for the test to look the payments up in the store.
Exits non-zero on the first failed check.
"""

import asyncio
import base64
import json
import os
import sys

import httpx
from eth_account import Account
from mpp.client import PaymentTransport
from mpp.methods.evm import BASE_USDC
from mpp.methods.evm import client as evm

KEY = os.environ.get(
    "SGL_TEST_PAYER_KEY",
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
)


class Recording(httpx.AsyncBaseTransport):
    """Passes requests through, keeping the payment headers each one sent."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[dict[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(
            {
                k: request.headers[k]
                for k in ("authorization", "payment-signature", "x-payment")
                if k in request.headers
            }
        )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def paid_by_mpp(r: httpx.Response, recorder: Recording, what: str) -> str:
    """Checks one MPP-paid exchange; returns the credential sent."""
    check(r.status_code == 200, f"{what}: paid ({r.status_code} {r.text[:300]})")
    check(len(recorder.sent) == 2, f"{what}: one 402, one paid retry")
    check(recorder.sent[0] == {}, f"{what}: the first request carried no payment")
    paid = recorder.sent[1]
    check(
        set(paid) == {"authorization"} and paid["authorization"].startswith("Payment "),
        f"{what}: the client paid with Authorization: Payment (MPP), not x402",
    )
    receipt = r.headers.get("payment-receipt")
    check(receipt is not None, f"{what}: Payment-Receipt present")
    decoded = json.loads(base64.urlsafe_b64decode(receipt + "=" * (-len(receipt) % 4)))
    check(decoded["status"] == "success" and decoded["method"] == "evm", f"{what}: receipt content")
    check(
        "payment-response" not in r.headers and "x-payment-response" not in r.headers,
        f"{what}: no x402 settlement header",
    )
    return paid["authorization"]


async def pay(url: str, body: dict, account) -> tuple[httpx.Response, Recording]:
    recorder = Recording()
    transport = PaymentTransport([evm.charge(currency=BASE_USDC, account=account)], inner=recorder)
    async with httpx.AsyncClient(transport=transport, timeout=60) as c:
        r = await c.post(url, json=body)
        r.read()
    return r, recorder


async def main(base: str, model: str) -> None:
    account = Account.from_key(KEY)
    print(f"payer={account.address.lower()}")

    chat_url = f"{base}/v1/chat/completions"
    chat = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "paid through mpp"}]}
    r, rec = await pay(chat_url, chat, account)
    chat_cred = paid_by_mpp(r, rec, "chat")
    answer = r.json()["choices"][0]["message"]["content"]
    check(answer == "paid through mpp", f"chat answer {answer!r}")

    topup_url = f"{base}/compute/credits/topup"
    r, rec = await pay(topup_url, {"amount": "1"}, account)
    topup_cred = paid_by_mpp(r, rec, "top-up")
    body = r.json()
    check(body["deposited_micros"] == 1_000_000, f"top-up deposited $1 ({body})")
    check(body["wallet"] == account.address.lower(), "credits went to the paying wallet")

    # Each credential again, by hand: refused, nothing runs or is credited.
    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(chat_url, json=chat, headers={"Authorization": chat_cred})
        check(r.status_code == 402, f"chat credential replay refused ({r.status_code})")
        check("payment-receipt" not in r.headers, "no receipt for the replay")
        r = await plain.post(topup_url, json={"amount": "1"}, headers={"Authorization": topup_cred})
        check(r.status_code == 402, f"top-up credential replay refused ({r.status_code})")
    print("pympp grid payment: all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/"), sys.argv[2]))
