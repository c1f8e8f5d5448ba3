// The browser entry: `new Client({ url })` speaks gRPC-Web to the manager's UI port (url:
// its origin and base path, e.g. `document.baseURI`). No Node modules are imported here.
import { Client as BaseClient, type ClientOptions } from "./client.js";
import { grpcWebTransport } from "./shared.js";

export * from "./shared.js";

/** A connection to an agentrun manager (browsers: gRPC-Web unless `transport` says otherwise). */
export class Client extends BaseClient {
  constructor(options: ClientOptions) {
    super(options, grpcWebTransport);
  }
}
