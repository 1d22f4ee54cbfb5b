//! `fake-kube-apiserver`: a **fake** Kubernetes API server, for tests only, that serves
//! core/v1 **Nodes** and nothing else.
//!
//! No real API server can run where this project's tests run, so the node daemon's Kubernetes
//! registry is tested against this fake. It aims to be honest: where it answers, it answers as
//! kube-apiserver (1.32) does — same paths, status codes, `Status` objects, reasons and
//! messages; where it does not implement something, it says so (in the list below and in its
//! answers) instead of pretending.
//!
//! # Serving
//! [`FakeApiServer::start`] serves **HTTPS** (HTTP/1.1) on `127.0.0.1:<ephemeral port>` with a
//! CA it makes at start (the server certificate has the SANs `127.0.0.1` and `localhost`), since
//! client-go and the `kube` crate will not send a bearer token over plain http. It exposes
//! [`url`](FakeApiServer::url), [`ca_pem`](FakeApiServer::ca_pem),
//! [`token`](FakeApiServer::token) and [`write_kubeconfig`](FakeApiServer::write_kubeconfig).
//! Requests without that bearer token get `401` everywhere (as with `--anonymous-auth=false`).
//! The fake runs on a tokio runtime of its own, so it works from `#[test]` and `#[tokio::test]`
//! alike; every control on the handle is a plain (non-async) method that never blocks on that
//! runtime, and waits come in a blocking ([`wait_for`](FakeApiServer::wait_for)) and an async
//! ([`wait_for_async`](FakeApiServer::wait_for_async)) flavour.
//!
//! ```no_run
//! use fake_kube_apiserver::{AuthMode, FakeApiServer, FakeOptions, NodeBuilder, Verb};
//! # async fn demo(dir: &std::path::Path) {
//! let fake = FakeApiServer::start(FakeOptions::default()).await;
//! fake.put_node(NodeBuilder::new("n1").internal_ip("10.0.0.1").hostname("n1").os_image("Talos"));
//! fake.write_kubeconfig(dir.join("kubeconfig")).unwrap();
//! // ... run the code under test against that kubeconfig, then look at what it did:
//! let seen = fake
//!     .wait_for_async(std::time::Duration::from_secs(10), |o| !o.patches.is_empty())
//!     .await
//!     .expect("a PATCH");
//! assert_eq!(seen.patches[0].content_type, "application/strategic-merge-patch+json");
//! // Faults: a kubelet credential on Kubernetes >= 1.32 may not list Nodes.
//! fake.set_auth(Verb::List, AuthMode::NodeCredential { node: "n1".into() });
//! # }
//! ```
//!
//! # What it implements
//! - `GET /api/v1/nodes` → `NodeList` (`metadata.resourceVersion`; items without
//!   `kind`/`apiVersion`, as the real server sends them). `limit`/`continue` paging with
//!   consistent snapshots (`remainingItemCount` when no selector is used); `resourceVersion`
//!   unset (most recent), `"0"` (any — the fake is always current), or `N` with
//!   `resourceVersionMatch=NotOlderThan` (current state) / `Exact` (the state at `N`, `410
//!   Expired` when compacted); `N` with `limit` and no match is `Exact`, as in the real server.
//!   A too-new `N` gets `504` `Too large resource version` at once (the real server waits up to
//!   3 s first). `labelSelector` (full grammar) and `fieldSelector` (`metadata.name`,
//!   `spec.unschedulable`; other fields → `400 field label not supported`). The option checks of
//!   `ValidateListOptions` (`422` on `ListOptions.meta.k8s.io`).
//! - `GET /api/v1/nodes?watch=true|1` → `200` and a stream of newline-delimited `WatchEvent`s
//!   (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`) in resourceVersion order:
//!   `resourceVersion` unset or `"0"` starts with a synthetic `ADDED` per Node; `N` replays the
//!   retained changes after `N`. A watch from before the last [`compact`](FakeApiServer::compact)
//!   gets what kube-apiserver sends for that: **HTTP 200** with one `ERROR` event whose object is
//!   a `Status` with `code: 410`, `reason: Expired`, `message: "too old resource version: N
//!   (C)"`, then the stream ends. With selectors, objects entering/leaving the selection are
//!   sent as `ADDED`/`DELETED`. `allowWatchBookmarks=true` → `BOOKMARK` events (a `Node` with
//!   only `metadata.resourceVersion`) every [`FakeOptions::bookmark_interval`] and on
//!   [`send_bookmarks`](FakeApiServer::send_bookmarks). `sendInitialEvents=true` (watch-list)
//!   sends the current Nodes as `ADDED`, then a `BOOKMARK` annotated
//!   `k8s.io/initial-events-end: "true"`. `timeoutSeconds` ends the stream cleanly; without it
//!   [`FakeOptions::default_watch_timeout`] applies.
//! - `GET /api/v1/nodes/{name}` → the Node, or `404` `nodes "x" not found` (`reason: NotFound`).
//! - `PATCH /api/v1/nodes/{name}` with `application/merge-patch+json` (RFC 7386),
//!   `application/strategic-merge-patch+json` (maps only: `null` deletes, `$patch:
//!   replace|delete`; lists and list directives are refused with `422`) or
//!   `application/json-patch+json` (RFC 6902). Only `metadata.labels` and
//!   `metadata.annotations` may change (validated as the real server validates them: `422`
//!   `Invalid`; non-string values `400`); `status` changes are ignored as on the real main
//!   resource; `metadata.resourceVersion`/`uid` in the patch are preconditions (`409
//!   Conflict`); any other change is refused with `422` and a message naming the fake (the real
//!   server would apply it). A patch that changes nothing does not bump the resourceVersion.
//!   `dryRun=All` is honoured. Other content types → `415`, including
//!   `application/apply-patch+yaml` (server-side apply is **not** implemented).
//! - Discovery for kubectl: `/version`, `/api`, `/apis` (no groups), `/api/v1` (only `nodes`,
//!   verbs `get list patch watch`), `/healthz`, `/livez`, `/readyz`. Aggregated discovery is not
//!   offered; clients fall back to these legacy documents.
//! - Every other path → `404` `the server could not find the requested resource`; other
//!   methods on the Node paths → `405` naming the fake.
//!
//! # Test controls
//! Nodes: [`put_node`](FakeApiServer::put_node) (from a [`NodeBuilder`]),
//! [`delete_node`](FakeApiServer::delete_node), [`modify_node`](FakeApiServer::modify_node),
//! [`patch_annotations`](FakeApiServer::patch_annotations), [`node`](FakeApiServer::node).
//! Records: [`patches`](FakeApiServer::patches), [`requests`](FakeApiServer::requests).
//! Faults: [`set_auth`](FakeApiServer::set_auth) per [`Verb`] ([`AuthMode::Unauthorized`] →
//! `401`; [`AuthMode::Forbidden`] → an RBAC `403`; [`AuthMode::NodeCredential`] → the Node
//! authorizer of Kubernetes ≥ 1.32 with `AuthorizeNodeWithSelectors`: a kubelet may read only
//! its own Node, `nodes is forbidden: User "system:node:n1" cannot list resource "nodes" in API
//! group "" at the cluster scope: node 'n1' cannot read all nodes, only its own Node object`,
//! and NodeRestriction refuses patches to other Nodes), [`compact`](FakeApiServer::compact),
//! [`set_delay`](FakeApiServer::set_delay), [`close_watches`](FakeApiServer::close_watches),
//! [`drop_connections`](FakeApiServer::drop_connections),
//! [`set_refuse_connections`](FakeApiServer::set_refuse_connections),
//! [`stop`](FakeApiServer::stop) / [`restart`](FakeApiServer::restart) (same port, same state).
//!
//! # What it does not implement
//! Any resource but Nodes; create/update/delete through the API; subresources (`/status`,
//! `/proxy`); `managedFields` and server-side apply; protobuf and `Table` output (it always
//! answers `application/json`, which clients accept); HTTP/2; the legacy `/api/v1/watch/`
//! paths; the inconsistent-continue token of a `410` list; NodeRestriction's label rules;
//! admission webhooks; the watch cache's 3 s wait for a too-new resourceVersion.

mod api;
mod kubeconfig;
mod node;
mod patch;
mod selector;
mod server;
mod status;
mod store;
mod tls;
mod util;
mod validate;

use std::time::Duration;

pub use node::NodeBuilder;
pub use patch::PatchType;
pub use server::FakeApiServer;
pub use store::{Observed, PatchRecord, RequestRecord};

/// An API verb on Nodes, for [`FakeApiServer::set_auth`] and [`RequestRecord::verb`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `GET /api/v1/nodes`
    List,
    /// `GET /api/v1/nodes?watch=true`
    Watch,
    /// `GET /api/v1/nodes/{name}`
    Get,
    /// `PATCH /api/v1/nodes/{name}`
    Patch,
}

/// How the fake authorizes requests of one [`Verb`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Allowed.
    #[default]
    Ok,
    /// `401` `Unauthorized` (the credential is not accepted).
    Unauthorized,
    /// `403` from RBAC for `user`: `nodes is forbidden: User "<user>" cannot <verb> resource
    /// "nodes" in API group "" at the cluster scope`.
    Forbidden {
        /// The user name in the message.
        user: String,
    },
    /// A kubelet credential (`system:node:<node>`) under the Node authorizer of Kubernetes ≥
    /// 1.32 (`AuthorizeNodeWithSelectors`) and NodeRestriction: reads of its own Node (a get,
    /// or a list/watch with `fieldSelector=metadata.name=<node>`) and patches of it are
    /// allowed; reads of all or other Nodes and patches of other Nodes get `403`.
    NodeCredential {
        /// The node's name.
        node: String,
    },
}

/// Settings for [`FakeApiServer::start`].
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// The bearer token to accept; a random one when `None`.
    pub token: Option<String>,
    /// Port on 127.0.0.1; 0 (the default) for an ephemeral one.
    pub port: u16,
    /// Period of BOOKMARK events on watches that allow them (default 60 s, about what the real
    /// server does).
    pub bookmark_interval: Duration,
    /// Watch duration when the client sends no `timeoutSeconds` (default 1800 s, the real
    /// server's `--min-request-timeout`).
    pub default_watch_timeout: Duration,
    /// `(major, minor, patch)` served by `/version` (default 1.32.0).
    pub kubernetes_version: (u32, u32, u32),
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            token: None,
            port: 0,
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
            kubernetes_version: (1, 32, 0),
        }
    }
}
