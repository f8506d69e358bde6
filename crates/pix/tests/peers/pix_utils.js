// The independent side of the BR Code round trips: npm pix-utils encodes the specs and decodes
// the payloads it is given (JSON on stdin: {"encode":[spec], "decode":[payload]}), and prints
// {"encoded":[payload|{error}], "decoded":[fields|{error}]}.
const { createStaticPix, createDynamicPix, parsePix, hasError } = require('pix-utils');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const encoded = input.encode.map((s) => {
  const pix = s.url
    ? createDynamicPix({ merchantName: s.name, merchantCity: s.city, url: s.url })
    : createStaticPix({
        merchantName: s.name,
        merchantCity: s.city,
        pixKey: s.key,
        infoAdicional: s.info || '',
        transactionAmount: s.amount === null ? 0 : s.amount / 100,
        txid: s.txid || '',
      });
  return hasError(pix) ? { error: pix.message } : pix.toBRCode();
});
const decoded = input.decode.map((payload) => {
  const pix = parsePix(payload);
  if (hasError(pix)) return { error: pix.message };
  return {
    type: pix.type,
    key: pix.pixKey || null,
    url: pix.url || null,
    name: pix.merchantName,
    city: pix.merchantCity,
    amount: pix.transactionAmount ? Math.round(pix.transactionAmount * 100) : null,
    txid: pix.txid && pix.txid !== '***' ? pix.txid : null,
    info: pix.infoAdicional || null,
  };
});
process.stdout.write(JSON.stringify({ encoded, decoded }));
