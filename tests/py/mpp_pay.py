"""Pay an sgl server's MPP challenge with the official client (PyPI pympp 0.16.0).

Usage: mpp_pay.py BASE_URL

pympp's EVM `charge` method answers the `WWW-Authenticate: Payment` challenge
of BASE_URL/paid/echo with an EIP-3009 `authorization` credential. Note that
pympp 0.16.0 binds the challenge with nonce = keccak256(JSON([id, realm]))
(`mpp.methods.evm._eip3009.challenge_hash`), where the MPP vectors use
keccak256(id || realm); sgl accepts both. The script checks the Payment-Receipt
and that the same credential cannot be used twice.
"""

import asyncio
import base64
import json
import os
import sys

import httpx
from eth_account import Account
from eth_utils.crypto import keccak
from mpp.client import Mpp, PaymentTransport
from mpp.methods.evm import BASE_USDC
from mpp.methods.evm import client as evm

KEY = os.environ.get(
    "SGL_TEST_PAYER_KEY",
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
)


class Recording(httpx.AsyncBaseTransport):
    """Passes requests through, keeping the Payment credentials sent."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        if auth.startswith("Payment "):
            self.sent.append(auth)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


async def main(base: str) -> None:
    account = Account.from_key(KEY)
    url = f"{base}/paid/echo"
    method = evm.charge(currency=BASE_USDC, account=account)
    async with Mpp(methods=[method]) as mpp:
        r = await mpp.fetch(url, method="POST", json={"hi": "mpp"})
        check(r.status_code == 200, f"MPP payment accepted ({r.status_code} {r.text[:300]})")
        receipt = r.headers.get("payment-receipt")
        check(receipt is not None, "Payment-Receipt present")
        pad = "=" * (-len(receipt) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(receipt + pad))
        check(decoded["status"] == "success" and decoded["method"] == "evm", "receipt content")
        check(r.json()["paid_by"] == account.address.lower(), "paid by the client's account")

    # Replay the client's credential by hand: refused as an RFC 9457 problem.
    recorder = Recording()
    transport = PaymentTransport([evm.charge(currency=BASE_USDC, account=account)], inner=recorder)
    async with httpx.AsyncClient(transport=transport) as c:
        r = await c.post(url, json={"hi": "again"})
        check(r.status_code == 200, "second MPP payment accepted")
    sent = recorder.sent
    check(len(sent) == 1, "captured the credential")
    # Which binding nonce did the client sign?
    token = sent[-1].split(" ", 1)[1]
    cred = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    cid, realm = cred["challenge"]["id"], cred["challenge"]["realm"]
    concat = "0x" + keccak(text=cid + realm).hex()
    as_json = "0x" + keccak(text=json.dumps([cid, realm], separators=(",", ":"))).hex()
    nonce = cred["payload"]["nonce"].lower()
    form = "keccak256(id || realm)" if nonce == concat else "keccak256(JSON([id, realm]))" if nonce == as_json else None
    check(form is not None, f"client nonce binds the challenge, as {form}")
    async with httpx.AsyncClient() as plain:
        r = await plain.post(url, json={"hi": "again"}, headers={"Authorization": sent[-1]})
        check(r.status_code == 402, "reused MPP credential refused")
        check(r.headers["content-type"].startswith("application/problem+json"), "problem+json body")
    print("MPP client: all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/")))
