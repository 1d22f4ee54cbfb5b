//! One discovery service, as Sidero's client talks to it (reference §8.2), driven
//! by events instead of a goroutine: wait out the backoff (also before the first
//! connect), Hello (keep the public IP, follow a redirect), Watch, then
//! AffiliateUpdate whenever this node's data changed and every TTL/2. Any failure
//! drops the watch and starts over after the backoff; the peers seen so far stay
//! until the next snapshot replaces them (Q23).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use discovery_sdk::crypto::{open_affiliate, open_endpoint};
use discovery_sdk::grpc::{Call, CallEvent, Channel, OK};
use discovery_sdk::{info, warn};
use prost::Message;

use crate::messages::{self, AffiliateDeleteRequest, AffiliateUpdateRequest, HelloRequest};
use crate::peers::Peer;
use discovery_sdk::backoff::Backoff;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);
const DELETE_TIMEOUT: Duration = Duration::from_secs(2);

/// What this node publishes: sealed once per change, re-sent as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalData {
    pub data: Vec<u8>,
    pub endpoints: Vec<Vec<u8>>,
}

/// Who we are to the service.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: String,
    pub client_version: String,
    pub ttl: Duration,
}

enum Phase {
    /// Waiting before the next connect.
    Backoff {
        until: Instant,
    },
    Hello(Call),
    Connected {
        watch: Call,
        /// The first Watch message (the snapshot) came.
        synced: bool,
        refresh: Option<Call>,
        next_refresh: Instant,
    },
}

/// An event of one of the client's calls.
enum Taken {
    Hello(CallEvent),
    Watch(CallEvent),
    Refresh(CallEvent),
    Nothing,
}

/// What an event changed, for the registry to act on.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Changed {
    pub peers: bool,
    pub public_ip: bool,
}

pub struct Client {
    pub name: String,
    endpoint: String,
    keepalive: Duration,
    channel: Option<Channel>,
    phase: Phase,
    backoff: Backoff,
    /// This node's data changed since the last successful update.
    dirty: bool,
    pub public_ip: Option<IpAddr>,
    /// The other nodes, by the server's affiliate ID.
    pub peers: BTreeMap<String, Peer>,
    /// Affiliates whose bad entries were logged already (once per peer).
    warned: BTreeSet<String>,
    /// Entries skipped because they did not open or decode.
    pub skipped: u64,
    pub last_error: Option<String>,
}

impl Client {
    pub fn new(name: &str, endpoint: &str, ttl: Duration) -> Client {
        let mut backoff = Backoff::default();
        Client {
            name: name.to_string(),
            endpoint: endpoint.to_string(),
            // The reference's client keepalive: max(10 s, TTL/10).
            keepalive: (ttl / 10).max(Duration::from_secs(10)),
            channel: None,
            phase: Phase::Backoff {
                until: Instant::now() + backoff.next_delay(),
            },
            backoff,
            dirty: true,
            public_ip: None,
            peers: BTreeMap::new(),
            warned: BTreeSet::new(),
            skipped: 0,
            last_error: None,
        }
    }

    pub fn is_synced(&self) -> bool {
        matches!(self.phase, Phase::Connected { synced: true, .. })
    }

    /// When this client next needs to act on its own.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Backoff { until } => Some(*until),
            Phase::Hello(_) => None,
            Phase::Connected {
                refresh: None,
                next_refresh,
                ..
            } => Some(*next_refresh),
            Phase::Connected { .. } => None,
        }
    }

    /// Acts on a passed deadline: connect after a backoff, or refresh.
    pub fn on_deadline(&mut self, me: &Identity, local: Option<&LocalData>) {
        let now = Instant::now();
        match &self.phase {
            Phase::Backoff { until } if *until <= now => self.hello(me),
            Phase::Connected { next_refresh, .. } if *next_refresh <= now => {
                self.dirty = true;
                self.refresh(me, local);
                // Nothing to send yet: come back at the next period, not at once.
                if let Phase::Connected {
                    refresh: None,
                    next_refresh,
                    ..
                } = &mut self.phase
                {
                    *next_refresh = now + me.ttl / 2;
                }
            }
            _ => {}
        }
    }

    /// This node's data changed: send it now if connected.
    pub fn local_changed(&mut self, me: &Identity, local: Option<&LocalData>) {
        self.dirty = true;
        self.refresh(me, local);
    }

    /// Whether `call` belongs to this client.
    pub fn owns(&self, call: u32) -> bool {
        match &self.phase {
            Phase::Backoff { .. } => false,
            Phase::Hello(hello) => hello.id() == call,
            Phase::Connected { watch, refresh, .. } => {
                watch.id() == call || refresh.as_ref().is_some_and(|r| r.id() == call)
            }
        }
    }

    /// Takes what call `call` has and moves on.
    pub fn on_ready(&mut self, call: u32, me: &Identity, local: Option<&LocalData>) -> Changed {
        let mut changed = Changed::default();
        match self.take(call) {
            Taken::Hello(CallEvent::Message(reply)) => {
                changed.public_ip = self.hello_replied(&reply, me);
            }
            Taken::Hello(CallEvent::Finished(status)) if status.code != OK => {
                self.fail(format!("hello failed: {}", status.message));
            }
            Taken::Watch(CallEvent::Message(bytes)) => {
                let snapshot = match &mut self.phase {
                    Phase::Connected { synced, .. } => !std::mem::replace(synced, true),
                    _ => false,
                };
                changed.peers = self.watched(&bytes, snapshot, me);
            }
            Taken::Watch(CallEvent::Finished(status)) => {
                let why = match status.message.is_empty() {
                    true => "by the server".to_string(),
                    false => status.message,
                };
                self.fail(format!("error watching discovery service state: {why}"));
            }
            Taken::Refresh(CallEvent::Finished(status)) if status.code == OK => {
                if let Phase::Connected {
                    refresh,
                    next_refresh,
                    ..
                } = &mut self.phase
                {
                    *refresh = None;
                    *next_refresh = Instant::now() + me.ttl / 2;
                }
                self.backoff.reset();
                self.last_error = None;
                // It changed again while the update was in flight.
                self.refresh(me, local);
            }
            Taken::Refresh(CallEvent::Finished(status)) => {
                self.fail(format!(
                    "failed refreshing discovery service data: {}",
                    status.message
                ));
            }
            _ => {}
        }
        changed
    }

    /// The next event of one of this client's calls, by which call it is.
    fn take(&self, call: u32) -> Taken {
        match &self.phase {
            Phase::Hello(hello) if hello.id() == call => match hello.next() {
                Some(e) => Taken::Hello(e),
                None => Taken::Nothing,
            },
            Phase::Connected { watch, .. } if watch.id() == call => match watch.next() {
                Some(e) => Taken::Watch(e),
                None => Taken::Nothing,
            },
            Phase::Connected {
                refresh: Some(refresh),
                ..
            } if refresh.id() == call => match refresh.next() {
                Some(e) => Taken::Refresh(e),
                None => Taken::Nothing,
            },
            _ => Taken::Nothing,
        }
    }

    fn hello(&mut self, me: &Identity) {
        let channel = match self.channel {
            Some(channel) => channel,
            None => match Channel::open(&self.endpoint, self.keepalive) {
                Ok(channel) => *self.channel.insert(channel),
                Err(e) => return self.fail(e),
            },
        };
        let request = HelloRequest {
            cluster_id: me.cluster_id.clone(),
            client_version: me.client_version.clone(),
        };
        match channel.unary(
            messages::HELLO,
            &request.encode_to_vec(),
            Some(HELLO_TIMEOUT),
        ) {
            Ok(call) => self.phase = Phase::Hello(call),
            Err(e) => self.fail(format!("hello failed: {e}")),
        }
    }

    /// Keeps the public IP, follows a redirect, else starts watching. Returns
    /// whether the public IP changed.
    fn hello_replied(&mut self, reply: &[u8], me: &Identity) -> bool {
        let reply = match messages::HelloResponse::decode(reply) {
            Ok(reply) => reply,
            Err(e) => {
                self.fail(format!("hello failed: undecodable reply: {e}"));
                return false;
            }
        };
        let ip = discovery_common::netip::addr_from_bytes(&reply.client_ip);
        let ip_changed = ip != self.public_ip;
        self.public_ip = ip;
        if let Some(redirect) = reply.redirect.filter(|r| !r.endpoint.is_empty()) {
            let scheme = self.endpoint.split("://").next().unwrap_or("https");
            let target = format!("{scheme}://{}", redirect.endpoint);
            if target != self.endpoint {
                match Channel::open(&target, self.keepalive) {
                    Ok(channel) => {
                        info!("{}: redirected to {target}", self.name);
                        self.endpoint = target;
                        self.channel = Some(channel);
                        self.back_off();
                        return ip_changed;
                    }
                    Err(e) => {
                        if self.warned.insert(format!("redirect {target}")) {
                            warn!("{}: not following the redirect: {e}", self.name);
                        }
                    }
                }
            }
        }
        let Some(channel) = self.channel else {
            self.fail("no channel".into());
            return ip_changed;
        };
        let request = messages::WatchRequest {
            cluster_id: me.cluster_id.clone(),
        };
        match channel.server_stream(messages::WATCH, &request.encode_to_vec(), None) {
            Ok(watch) => {
                self.phase = Phase::Connected {
                    watch,
                    synced: false,
                    refresh: None,
                    next_refresh: Instant::now(),
                };
                // Whatever the server had of us may be gone: send it again.
                self.dirty = true;
            }
            Err(e) => self.fail(format!("error watching discovery service state: {e}")),
        }
        ip_changed
    }

    /// Sends this node's data if it changed (or is due) and no update is in flight.
    fn refresh(&mut self, me: &Identity, local: Option<&LocalData>) {
        let (Some(local), Some(channel)) = (local, self.channel) else {
            return;
        };
        let Phase::Connected { refresh, .. } = &mut self.phase else {
            return;
        };
        if refresh.is_some() || !self.dirty {
            return;
        }
        let request = AffiliateUpdateRequest {
            cluster_id: me.cluster_id.clone(),
            affiliate_id: me.node_id.clone(),
            affiliate_data: Some(local.data.clone()),
            affiliate_endpoints: local.endpoints.clone(),
            ttl: Some(messages::Duration {
                seconds: me.ttl.as_secs() as i64,
                nanos: me.ttl.subsec_nanos() as i32,
            }),
        };
        match channel.unary(
            messages::AFFILIATE_UPDATE,
            &request.encode_to_vec(),
            Some(REFRESH_TIMEOUT),
        ) {
            Ok(call) => {
                *refresh = Some(call);
                self.dirty = false;
            }
            Err(e) => self.fail(format!("failed refreshing discovery service data: {e}")),
        }
    }

    /// Applies one Watch message; returns whether the peers changed. Entries
    /// that do not open or decode are skipped, counted and logged once per peer,
    /// and never end the watch (Q11, Q23).
    fn watched(&mut self, bytes: &[u8], snapshot: bool, me: &Identity) -> bool {
        let message = match messages::WatchResponse::decode(bytes) {
            Ok(message) => message,
            Err(e) => {
                self.skipped += 1;
                if self.warned.insert("watch message".into()) {
                    warn!("{}: undecodable watch message: {e}", self.name);
                }
                return false;
            }
        };
        let before = self.peers.clone();
        if snapshot {
            self.peers.clear();
        }
        for affiliate in message.affiliates {
            if affiliate.id == me.node_id {
                continue;
            }
            if message.deleted {
                self.peers.remove(&affiliate.id);
                continue;
            }
            // Endpoint-only affiliates carry no data; an existing entry stays.
            if affiliate.data.is_empty() {
                continue;
            }
            match self.open(&affiliate) {
                Ok(peer) => {
                    if peer.affiliate.node_id != affiliate.id
                        && self.warned.insert(format!("id {}", affiliate.id))
                    {
                        warn!(
                            "{}: affiliate {:?} holds node ID {:?}; it is shown under the node ID",
                            self.name, affiliate.id, peer.affiliate.node_id
                        );
                    }
                    self.peers.insert(affiliate.id, peer);
                }
                Err(e) => {
                    self.skipped += 1;
                    if self.warned.insert(affiliate.id.clone()) {
                        warn!("{}: affiliate {:?}: {e}", self.name, affiliate.id);
                    }
                }
            }
        }
        self.peers != before
    }

    /// Opens one affiliate and its endpoints. An endpoint that does not open is
    /// dropped (and logged once); the affiliate stays.
    fn open(&mut self, affiliate: &messages::Affiliate) -> Result<Peer, String> {
        let opened =
            open_affiliate(&affiliate.data).map_err(|e| format!("decryption failure: {e}"))?;
        let mut endpoints = Vec::with_capacity(affiliate.endpoints.len());
        for blob in &affiliate.endpoints {
            match open_endpoint(blob) {
                Ok(endpoint) => endpoints.push(endpoint),
                Err(e) => {
                    self.skipped += 1;
                    if self.warned.insert(format!("endpoint {}", affiliate.id)) {
                        warn!(
                            "{}: affiliate {:?}: endpoint unmarshal failure: {e}",
                            self.name, affiliate.id
                        );
                    }
                }
            }
        }
        Ok(Peer {
            affiliate: opened,
            endpoints,
        })
    }

    /// Starts deleting this node from the service (`discoveryd leave`).
    pub fn start_delete(&self, me: &Identity) -> Option<Call> {
        let request = AffiliateDeleteRequest {
            cluster_id: me.cluster_id.clone(),
            affiliate_id: me.node_id.clone(),
        };
        self.channel?
            .unary(
                messages::AFFILIATE_DELETE,
                &request.encode_to_vec(),
                Some(DELETE_TIMEOUT),
            )
            .ok()
    }

    fn fail(&mut self, error: String) {
        if self.last_error.as_ref() != Some(&error) {
            warn!("{} ({}): {error}", self.name, self.endpoint);
        }
        self.last_error = Some(error);
        self.back_off();
    }

    /// Drops the calls in flight and waits out the backoff before reconnecting.
    fn back_off(&mut self) {
        self.phase = Phase::Backoff {
            until: Instant::now() + self.backoff.next_delay(),
        };
    }
}
