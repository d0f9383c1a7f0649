module.exports = {
  container: "my-container-service",
  ist: [ { service: 'my db', variables: ['DATABASE_HOST'], hostnames: ['db.local'] } ],
};
