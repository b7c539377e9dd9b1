// Loaded into `wrangler dev` (NODE_OPTIONS=--require …; npm run worker:dev and the tests do).
//
// wrangler dev reaches Postgres through a local Hyperdrive proxy that pipes each workerd socket
// to a database socket with no 'error' listener on either. When workerd tears down a request
// whose client went away (an event stream a browser closed), it resets that request's database
// sockets, and the proxy's ECONNRESET is thrown as an uncaught exception: wrangler dev exits.
//
// Here a socket piped into another socket gets that listener: the error is printed, and the
// other side is closed too, so the database ends that session instead of keeping it open.
// Deployed Workers do not use this proxy.
const net = require("node:net");

const pipe = net.Socket.prototype.pipe;
const guarded = new WeakSet();

net.Socket.prototype.pipe = function (destination, options) {
  if (destination instanceof net.Socket && !guarded.has(this)) {
    guarded.add(this);
    this.on("error", (e) => {
      process.stderr.write(
        `[socket-guard] proxied socket failed (${e.code ?? e.message}); closing both sides\n`,
      );
      destination.destroy();
    });
  }
  return pipe.call(this, destination, options);
};
