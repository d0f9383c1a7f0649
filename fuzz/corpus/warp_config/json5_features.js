// comments, unquoted keys, trailing commas
module.exports = {
  /* several services */
  ist: [
    { service: "api", hostnames: ["api.local", "api.internal.test",], },
    { service: 'mes-données', variables: ["DONNEES", 'DATA_HOST'] },
    { service: "✅ db" },
  ],
  other: { nested: [1, 2.5, -3, 0x10, null, true, 'x'] },
};
