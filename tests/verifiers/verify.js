// The guide's Node.js verifier, verbatim, applied to captured requests. The guide's function
// re-serialises req.body with JSON.stringify, so it only accepts bodies that are compact JSON
// in JavaScript's own spelling — which is what kyberhook sends.
// Input (stdin): JSON list of {"secret", "timestamp", "signature", "body"}.
const crypto = require('crypto');

function verifyWebhook(req, signingSecret) {
  const signature = req.headers['x-kyberaccess-signature'];
  const timestamp = req.headers['x-kyberaccess-timestamp'];
  const body = JSON.stringify(req.body);
  const payload = `${timestamp}.${body}`;
  const expectedSignature = 'sha256=' +
    crypto.createHmac('sha256', signingSecret)
      .update(payload)
      .digest('hex');
  return crypto.timingSafeEqual(
    Buffer.from(signature),
    Buffer.from(expectedSignature)
  );
}

let input = '';
process.stdin.on('data', (c) => { input += c; });
process.stdin.on('end', () => {
  let failed = 0;
  for (const item of JSON.parse(input)) {
    const req = {
      headers: {
        'x-kyberaccess-signature': item.signature,
        'x-kyberaccess-timestamp': item.timestamp,
      },
      body: JSON.parse(item.body), // what express.json() hands the handler
    };
    let ok = false;
    try { ok = verifyWebhook(req, item.secret); } catch (e) { ok = false; }
    console.log(ok ? 'OK' : 'FAIL');
    if (!ok) failed++;
  }
  process.exit(failed ? 1 : 0);
});
