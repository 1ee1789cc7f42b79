# Verifies captured Standard Webhooks requests with the official Python library (PyPI
# `standardwebhooks`, installed on first use by tests/it/tools.rs into target/test-tools/python/).
# Input (stdin): JSON list of {"secret", "headers": {"webhook-id", ...}, "body"}; prints one line
# per item and exits 1 if any fails.
import json
import sys

from standardwebhooks.webhooks import Webhook

failed = 0
for item in json.load(sys.stdin):
    try:
        Webhook(item["secret"]).verify(item["body"], item["headers"])
        print("OK")
    except Exception as e:  # the library raises WebhookVerificationError (and others on bad input)
        print(f"FAIL {type(e).__name__}: {e}")
        failed += 1
sys.exit(1 if failed else 0)
