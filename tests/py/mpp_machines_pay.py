"""Rent a machine from sgl's Machines API with the official MPP Python client
(PyPI pympp 0.16.0), paying through MPP, not x402.

Usage: mpp_machines_pay.py BASE_URL PROVISION_JSON

1. POST BASE_URL/compute/provision unpaid: 402 with a
   `WWW-Authenticate: Payment` challenge;
2. pays it through pympp's PaymentTransport without any account (no X-Auth,
   no API key) and checks: the client sent `Authorization: Payment` and no
   x402 header, the answer carries `Payment-Receipt` and no x402 settlement
   header, the order is active with an address, no password is in it, and
   the one-time management key fields of seed 000 are there
   (`management_api_key` `x402c_…`, `management_api_key_id`,
   `management_api_key_last4`, `management_note`);
3. the management key lists and shows the machine (paid by `mpp`);
4. extends it by MPP with the management key (MPP extension needs auth);
5. an MPP extension without auth is refused (401, nothing settled);
6. the provision credential presented again is refused.
Prints `payer=<address>`, `order=<id>` and `key_id=<id>`. Exits non-zero on
the first failed check.
"""

import asyncio
import json
import os
import sys

import httpx
from eth_account import Account
from mpp.client import PaymentTransport
from mpp.methods.evm import BASE_USDC
from mpp.methods.evm import client as evm

# The checks of one MPP-paid exchange are the grid script's (imported
# without leaving a bytecode cache in the source tree).
sys.dont_write_bytecode = True
from mpp_grid_pay import Recording, check, paid_by_mpp  # noqa: E402

KEY = os.environ.get(
    "SGL_TEST_PAYER_KEY",
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
)


async def pay(url: str, body: dict, account, headers: dict | None = None):
    recorder = Recording()
    transport = PaymentTransport([evm.charge(currency=BASE_USDC, account=account)], inner=recorder)
    async with httpx.AsyncClient(transport=transport, timeout=120, headers=headers or {}) as c:
        r = await c.post(url, json=body)
        r.read()
    return r, recorder


async def main(base: str, order: dict) -> None:
    account = Account.from_key(KEY)
    payer = account.address.lower()
    print(f"payer={payer}")
    url = f"{base}/compute/provision"

    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(url, json=order)
        check(r.status_code == 402, f"unpaid provision answered 402 ({r.status_code})")
        check(
            r.headers.get("www-authenticate", "").startswith("Payment "),
            "402 carries an MPP challenge",
        )

    r, rec = await pay(url, order, account)
    cred = paid_by_mpp(r, rec, "provision")
    body = r.json()
    o = body["order"]
    check(body["success"] is True, "success")
    check(o["status"] == "active" and o["ip_address"], "order active with an address")
    check(o["payment"] == "mpp", f"paid by mpp ({o['payment']})")
    check(
        "password" not in json.dumps(o).lower().replace("password_available", ""),
        "no password in the order",
    )
    key = body.get("management_api_key")
    check(isinstance(key, str) and key.startswith("x402c_"), "management_api_key x402c_…")
    check(isinstance(body.get("management_api_key_id"), str), "management_api_key_id")
    check(body.get("management_api_key_last4") == key[-4:], "management_api_key_last4")
    check("shown once" in body.get("management_note", ""), "management_note")
    print(f"order={o['id']}")
    print(f"key_id={body['management_api_key_id']}")

    auth = {"x-api-key": key}
    async with httpx.AsyncClient(timeout=60, headers=auth) as managed:
        r = await managed.get(f"{base}/compute/instances")
        ids = [i["id"] for i in r.json()["instances"]]
        check(r.status_code == 200 and ids == [o["id"]], f"the key lists the machine ({ids})")
        r = await managed.get(f"{base}/compute/instances/{o['id']}")
        check(r.status_code == 200 and r.json()["instance"]["payment"] == "mpp", "the key shows it")

    ext_url = f"{base}/compute/instances/{o['id']}/extend"
    r, rec = await pay(ext_url, {"extend_hours": 24}, account, auth)
    paid_by_mpp(r, rec, "extend with the management key")
    ext = r.json()
    check(ext["charged_micros"] * 2 == ext["instance"]["paid_micros"], f"extension charged ({ext})")

    r, rec = await pay(ext_url, {"extend_hours": 24}, account)
    check(r.status_code == 401, f"MPP extension without auth refused ({r.status_code} {r.text[:200]})")
    check(r.json()["error"]["code"] == "auth_required", "auth_required")
    check("payment-receipt" not in r.headers, "no receipt for the refused extension")

    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(url, json=order, headers={"Authorization": cred})
        check(r.status_code == 402, f"provision credential replay refused ({r.status_code})")
        check("payment-receipt" not in r.headers, "no receipt for the replay")
    print("pympp machines payment: all checks passed", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/"), json.loads(sys.argv[2])))
