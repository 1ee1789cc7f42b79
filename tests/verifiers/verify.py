# The guide's Python verifier, verbatim, applied to captured requests.
# Input (stdin): JSON list of {"secret", "timestamp", "signature", "body"}; prints one line per
# item and exits 1 if any fails.
import hmac
import hashlib
import json
import sys


def verify_webhook(payload, timestamp, signature, signing_secret):
    message = f"{timestamp}.{payload}"
    expected = 'sha256=' + hmac.new(
        signing_secret.encode(),
        message.encode(),
        hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(signature, expected)


failed = 0
for item in json.load(sys.stdin):
    ok = verify_webhook(item["body"], item["timestamp"], item["signature"], item["secret"])
    print("OK" if ok else "FAIL")
    failed += 0 if ok else 1
sys.exit(1 if failed else 0)
