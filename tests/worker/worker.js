// Test and demo upstream for wsgate: a Worker whose Durable Objects hold live
// WebSockets in memory (no hibernation), as the real service does.
//
//   GET  /health                    -> 200 "ok"
//   GET  /echo-headers              -> JSON object of the request headers
//   WS   /registry/ws[?...]         -> echo socket on the global Registry object
//   WS   /room/{room}/ws[?...]      -> echo socket on that room's Room object
//   GET  /stats/registry            -> {"sockets":N,"max_sockets":M,"accepted":K}
//   GET  /stats/room/{room}         -> same, for the room
//   POST /stats/reset/registry      -> max_sockets and accepted := sockets
//   POST /stats/reset/room/{room}   -> same, for the room
//
// A non-upgrade request to a /ws path gets 426; any other path gets 404.

const ROOM_WS = /^\/room\/([^/]+)\/ws$/;
const ROOM_STATS = /^\/stats\/room\/([^/]+)$/;
const ROOM_RESET = /^\/stats\/reset\/room\/([^/]+)$/;

function json(value, status = 200) {
  return new Response(JSON.stringify(value), {
    status,
    headers: { "content-type": "application/json" },
  });
}

function text(body, status) {
  return new Response(body, { status, headers: { "content-type": "text/plain" } });
}

function isUpgrade(request) {
  return (request.headers.get("upgrade") || "").toLowerCase() === "websocket";
}

function roomName(segment) {
  try {
    const name = decodeURIComponent(segment);
    return name.length > 0 && name.length <= 256 ? name : null;
  } catch {
    return null;
  }
}

function registryStub(env) {
  return env.REGISTRY.get(env.REGISTRY.idFromName("global"));
}

function roomStub(env, name) {
  return env.ROOM.get(env.ROOM.idFromName(name));
}

// Path inside a Durable Object: "/ws" (upgrade), "/stats" (GET), "/reset" (POST).
function toObject(stub, request, path) {
  if (path === "/ws") {
    return stub.fetch(request);
  }
  return stub.fetch(new Request("http://do" + path, { method: request.method }));
}

function methodCheck(request, allowed) {
  return allowed.includes(request.method)
    ? null
    : new Response("method not allowed\n", { status: 405, headers: { allow: allowed.join(", ") } });
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const path = url.pathname;

    if (path === "/health") {
      return methodCheck(request, ["GET", "HEAD"]) || text("ok", 200);
    }
    if (path === "/echo-headers") {
      return json(Object.fromEntries(request.headers));
    }

    // WebSocket endpoints.
    let stub = null;
    if (path === "/registry/ws") {
      stub = registryStub(env);
    } else {
      const m = ROOM_WS.exec(path);
      if (m) {
        const name = roomName(m[1]);
        if (name === null) return text("bad room name\n", 400);
        stub = roomStub(env, name);
      }
    }
    if (stub !== null) {
      if (!isUpgrade(request)) {
        // workerd drops an Upgrade header on responses, so none is set here.
        return text("expected websocket upgrade\n", 426);
      }
      return toObject(stub, request, "/ws");
    }

    // Stats.
    if (path === "/stats/registry") {
      return methodCheck(request, ["GET"]) || toObject(registryStub(env), request, "/stats");
    }
    if (path === "/stats/reset/registry") {
      return methodCheck(request, ["POST"]) || toObject(registryStub(env), request, "/reset");
    }
    let m = ROOM_STATS.exec(path);
    if (m) {
      const name = roomName(m[1]);
      if (name === null) return text("bad room name\n", 400);
      return methodCheck(request, ["GET"]) || toObject(roomStub(env, name), request, "/stats");
    }
    m = ROOM_RESET.exec(path);
    if (m) {
      const name = roomName(m[1]);
      if (name === null) return text("bad room name\n", 400);
      return methodCheck(request, ["POST"]) || toObject(roomStub(env, name), request, "/reset");
    }

    return text("not found\n", 404);
  },
};

// Close codes that may be sent on the wire (RFC 6455 7.4).
function sendableCode(code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

// Shared by both classes: accept, echo, count.
class EchoObject {
  constructor(state, env) {
    this.state = state;
    this.env = env;
    this.sockets = new Set();
    this.maxSockets = 0;
    this.accepted = 0;
  }

  stats() {
    return { sockets: this.sockets.size, max_sockets: this.maxSockets, accepted: this.accepted };
  }

  async fetch(request) {
    if (isUpgrade(request)) {
      return this.accept();
    }
    const path = new URL(request.url).pathname;
    if (path === "/stats") {
      return json(this.stats());
    }
    if (path === "/reset") {
      this.maxSockets = this.sockets.size;
      this.accepted = this.sockets.size;
      return json(this.stats());
    }
    return text("not found\n", 404);
  }

  accept() {
    const [client, server] = Object.values(new WebSocketPair());
    // Recent compatibility dates default to "blob"; echo binary as binary.
    server.binaryType = "arraybuffer";
    server.accept();
    this.sockets.add(server);
    this.accepted += 1;
    if (this.sockets.size > this.maxSockets) this.maxSockets = this.sockets.size;

    server.addEventListener("message", (event) => {
      try {
        server.send(event.data);
      } catch {
        this.sockets.delete(server);
      }
    });
    server.addEventListener("close", (event) => {
      this.sockets.delete(server);
      // Complete the closing handshake.
      try {
        if (sendableCode(event.code)) {
          server.close(event.code, event.reason);
        } else {
          server.close(1000);
        }
      } catch {
        // Already closed.
      }
    });
    server.addEventListener("error", () => {
      this.sockets.delete(server);
    });

    return new Response(null, { status: 101, webSocket: client });
  }
}

export class Registry extends EchoObject {}

export class Room extends EchoObject {}
