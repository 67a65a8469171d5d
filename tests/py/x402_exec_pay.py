"""Run code on sgl's code-execution API with the official x402 Python
client (PyPI x402 2.25.0).

Usage: x402_exec_pay.py BASE_URL

1. POST BASE_URL/api/x402/compute {"code": "print(1+1)"} unpaid: 402 with
   the x402 v2 PaymentRequired in the PAYMENT-REQUIRED header and the same
   object as the body, carrying extensions.bazaar, which the SDK's own
   Bazaar validator accepts (info against schema, and the spec's rules);
2. pays it through the SDK's httpx transport (x402 v2): 200, stdout "2\\n",
   exit code 0, and a PAYMENT-RESPONSE header reporting success.
Prints `payer=<address>`, then the 200 body as JSON on the last line.
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
from x402.extensions.bazaar import validate_and_extract
from x402.extensions.bazaar.facilitator import validate_discovery_extension_spec
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


async def main(base: str) -> None:
    account = Account.from_key(KEY)
    print(f"payer={account.address.lower()}")
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)
    url = f"{base}/api/x402/compute"
    body = {"stack": "python", "size": "small", "code": "print(1+1)"}

    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(url, json=body)
        check(r.status_code == 402, f"unpaid request answered 402 ({r.status_code})")
        header = r.headers.get("payment-required")
        check(header is not None, "PAYMENT-REQUIRED header")
        decoded = json.loads(base64.b64decode(header))
        check(decoded == r.json(), "the body is the PAYMENT-REQUIRED object")
        check(decoded["x402Version"] == 2, "x402 v2")
        check(decoded["accepts"][0]["amount"] == "2000", "small, default timeout: 2000 units")
        bazaar = decoded.get("extensions", {}).get("bazaar")
        check(bazaar is not None, "extensions.bazaar present")
        check(bazaar["info"]["input"]["method"] == "POST", "bazaar input is a POST")
        check("example" in bazaar["info"]["output"], "bazaar output example")
        v = validate_and_extract(bazaar)
        check(v.valid, f"the SDK's validator accepts the bazaar info against its schema {v.errors}")
        spec = validate_discovery_extension_spec(bazaar)
        check(spec.valid, f"the bazaar extension follows the spec {spec.errors}")
        required = x402HTTPClient(client).get_payment_required_response(
            lambda name: r.headers.get(name), r.json()
        )
        check(required.x402_version == 2, "the SDK read a v2 requirement")
        check(required.extensions and "bazaar" in required.extensions, "the SDK saw the bazaar extension")

    async with x402HttpxClient(client, timeout=120) as http:
        r = await http.post(url, json=body)
        check(r.status_code == 200, f"paid ({r.status_code} {r.text[:300]})")
        receipt = json.loads(base64.b64decode(r.headers["payment-response"]))
        check(receipt["success"] is True, "PAYMENT-RESPONSE success")
        check(receipt["payer"].lower() == account.address.lower(), "PAYMENT-RESPONSE names the payer")
        out = r.json()
        check(out["stdout"] == "2\n", f"stdout {out['stdout']!r}")
        check(out["exit_code"] == 0, "exit code 0")
        check(out["stack"] == "python" and out["size"] == "small", "stack and size echoed")
        check(out["sandbox_id"].startswith("sbx_"), "sandbox id")
        print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/")))
