// Verifies captured Standard Webhooks requests with the official Node library (npm
// `standardwebhooks`, installed on first use by tests/it/tools.rs into target/test-tools/node/).
// Input (stdin): JSON list of {"secret", "headers": {"webhook-id", ...}, "body"}; prints one line
// per item and exits 1 if any fails.
const { Webhook } = require('standardwebhooks');

let input = '';
process.stdin.on('data', (c) => { input += c; });
process.stdin.on('end', () => {
  let failed = 0;
  for (const item of JSON.parse(input)) {
    try {
      new Webhook(item.secret).verify(item.body, item.headers);
      console.log('OK');
    } catch (e) {
      console.log('FAIL ' + e.name + ': ' + e.message);
      failed++;
    }
  }
  process.exit(failed ? 1 : 0);
});
