# workerd config for the wsgate test/demo upstream.
# Run from this directory:
#   node_modules/.bin/workerd serve config.capnp --socket-addr http=127.0.0.1:PORT

using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "main", worker = .mainWorker),
  ],
  sockets = [
    (name = "http", address = "127.0.0.1:8787", http = (), service = "main"),
  ],
);

const mainWorker :Workerd.Worker = (
  modules = [
    (name = "worker.js", esModule = embed "worker.js"),
  ],
  compatibilityDate = "2026-11-01",
  bindings = [
    (name = "REGISTRY", durableObjectNamespace = "Registry"),
    (name = "ROOM", durableObjectNamespace = "Room"),
  ],
  durableObjectNamespaces = [
    # preventEviction keeps the in-memory counters alive between test cases.
    (className = "Registry", uniqueKey = "wsgate-test-registry", preventEviction = true),
    (className = "Room", uniqueKey = "wsgate-test-room", preventEviction = true),
  ],
  durableObjectStorage = (inMemory = void),
);
