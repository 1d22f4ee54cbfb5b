//! The fake against the `kube` crate (5.x, rustls): what the daemon's registry will use.

mod common;

use std::time::{Duration, Instant};

use common::{api_status, client, client_with_token, within};
use fake_kube_apiserver::{AuthMode, FakeApiServer, FakeOptions, NodeBuilder, Verb};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;

fn n(name: &str) -> NodeBuilder {
    NodeBuilder::new(name)
        .internal_ip(format!("10.0.0.{}", name.len()))
        .hostname(name)
        .os_image("Talos (v1.9.0)")
}

async fn fake_with(names: &[&str]) -> FakeApiServer {
    let fake = FakeApiServer::start(FakeOptions::default()).await;
    for name in names {
        fake.put_node(n(name));
    }
    fake
}

fn name_of(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

fn annotations(node: &Node) -> Vec<(String, String)> {
    node.metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Drives a watcher on its own task (the `kube` watcher only sends its requests while polled)
/// and hands its items over as a stream.
fn spawn_watcher<S>(
    stream: S,
) -> futures::stream::BoxStream<'static, Result<Event<Node>, watcher::Error>>
where
    S: futures::Stream<Item = Result<Event<Node>, watcher::Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(item).is_err() {
                break;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}

/// The next watcher event that is not an error.
async fn next_event<S>(stream: &mut S) -> Event<Node>
where
    S: futures::Stream<Item = Result<Event<Node>, watcher::Error>> + Unpin,
{
    loop {
        match within("a watcher event", stream.next()).await {
            Some(Ok(ev)) => return ev,
            Some(Err(_)) => continue,
            None => panic!("watcher stream ended"),
        }
    }
}

fn describe(ev: &Event<Node>) -> String {
    match ev {
        Event::Init => "Init".into(),
        Event::InitApply(n) => format!("InitApply({})", name_of(n)),
        Event::InitDone => "InitDone".into(),
        Event::Apply(n) => format!("Apply({})", name_of(n)),
        Event::Delete(n) => format!("Delete({})", name_of(n)),
    }
}

async fn expect_initial_list<S>(stream: &mut S, names: &[&str])
where
    S: futures::Stream<Item = Result<Event<Node>, watcher::Error>> + Unpin,
{
    let mut seen = Vec::new();
    loop {
        let ev = next_event(stream).await;
        let done = matches!(ev, Event::InitDone);
        seen.push(describe(&ev));
        if done {
            break;
        }
    }
    let mut want = vec!["Init".to_string()];
    want.extend(names.iter().map(|n| format!("InitApply({n})")));
    want.push("InitDone".into());
    assert_eq!(seen, want);
}

#[tokio::test]
async fn list_and_get_nodes() {
    let fake = fake_with(&["n1", "n2"]).await;
    fake.put_node(
        n("cp1")
            .label("node-role.kubernetes.io/control-plane", "")
            .annotation("cluster.talos.dev/node-id", "abc"),
    );
    let api: Api<Node> = Api::all(client(&fake).await);

    let list = api.list(&ListParams::default()).await.expect("list");
    let names: Vec<String> = list.items.iter().map(name_of).collect();
    assert_eq!(names, ["cp1", "n1", "n2"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(fake.resource_version().to_string())
    );

    let cp1 = api.get("cp1").await.expect("get");
    assert_eq!(
        annotations(&cp1),
        [("cluster.talos.dev/node-id".to_string(), "abc".to_string())]
    );
    assert!(
        cp1.metadata
            .labels
            .unwrap()
            .contains_key("node-role.kubernetes.io/control-plane")
    );
    assert!(cp1.metadata.uid.is_some());
    assert!(cp1.metadata.creation_timestamp.is_some());
    let status = cp1.status.expect("status");
    let addresses: Vec<(String, String)> = status
        .addresses
        .unwrap()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect();
    assert_eq!(
        addresses,
        [
            ("InternalIP".to_string(), "10.0.0.3".to_string()),
            ("Hostname".to_string(), "cp1".to_string())
        ]
    );
    assert_eq!(status.node_info.unwrap().os_image, "Talos (v1.9.0)");

    let err = api_status(api.get("missing").await.unwrap_err());
    assert_eq!(err.code, 404);
    assert_eq!(err.reason, "NotFound");
    assert_eq!(err.message, "nodes \"missing\" not found");
}

#[tokio::test]
async fn list_pages_are_a_consistent_snapshot() {
    let fake = fake_with(&["a", "b", "c", "d", "e"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);

    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let snapshot_rv = first.metadata.resource_version.clone();
    // A change after the first page must not show up in the later ones.
    fake.put_node(n("bb"));
    fake.delete_node("e");

    let mut names: Vec<String> = first.items.iter().map(name_of).collect();
    let mut token = first.metadata.continue_.clone();
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(page.metadata.resource_version, snapshot_rv);
        names.extend(page.items.iter().map(name_of));
        token = page.metadata.continue_.clone();
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);

    // After a compaction the old continue token is expired, as with a compacted etcd.
    let again = api.list(&ListParams::default().limit(2)).await.unwrap();
    fake.put_node(n("f"));
    fake.compact();
    let err = api
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(again.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err();
    let status = api_status(err);
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn merge_and_strategic_patches_of_annotations() {
    let fake = fake_with(&["n1"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);
    let rv0 = fake.resource_version();

    let patched = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "1", "b": "2"}}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(
        annotations(&patched),
        [("a".into(), "1".into()), ("b".into(), "2".into())]
    );
    let rv1 = fake.resource_version();
    assert_eq!(rv1, rv0 + 1);
    assert_eq!(patched.metadata.resource_version, Some(rv1.to_string()));

    let patched = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": null}}})),
        )
        .await
        .expect("merge patch delete");
    assert_eq!(annotations(&patched), [("b".into(), "2".into())]);

    let patched = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"c": "3", "b": null}}})),
        )
        .await
        .expect("strategic patch");
    assert_eq!(annotations(&patched), [("c".into(), "3".into())]);
    let stored = fake.node("n1").unwrap();
    assert_eq!(
        stored.pointer("/metadata/annotations"),
        Some(&json!({"c": "3"}))
    );

    // Deleting the last annotation leaves no map behind (omitempty).
    let patched = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"c": null}}})),
        )
        .await
        .unwrap();
    assert!(patched.metadata.annotations.is_none());

    // A patch that changes nothing keeps the resourceVersion.
    let before = fake.resource_version();
    api.patch("n1", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap();
    assert_eq!(fake.resource_version(), before);

    let types: Vec<String> = fake.patches().into_iter().map(|p| p.content_type).collect();
    assert_eq!(
        types,
        [
            "application/merge-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/merge-patch+json",
        ]
    );
    assert_eq!(
        fake.patches()[2].body,
        r#"{"metadata":{"annotations":{"c":"3","b":null}}}"#
    );
}

#[tokio::test]
async fn patch_refusals() {
    let fake = fake_with(&["n1"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);

    // Server-side apply is not implemented: 415, saying so.
    let err = api
        .patch(
            "n1",
            &PatchParams::apply("test"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})),
        )
        .await
        .unwrap_err();
    let status = api_status(err);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (415, "UnsupportedMediaType")
    );
    assert!(
        status.message.contains("server-side apply"),
        "{}",
        status.message
    );

    // A stale resourceVersion precondition: 409.
    let err = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "annotations": {"a": "b"}}})),
        )
        .await
        .unwrap_err();
    let status = api_status(err);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Operation cannot be fulfilled on nodes \"n1\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // Fields the fake does not model: 422 naming the fake.
    let err = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap_err();
    let status = api_status(err);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status.message.contains("fake-kube-apiserver"),
        "{}",
        status.message
    );

    // An invalid label key: 422 as the real validation words it.
    let err = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"bad key": "v"}}})),
        )
        .await
        .unwrap_err();
    let status = api_status(err);
    assert_eq!(status.code, 422);
    assert!(
        status
            .message
            .starts_with("Node \"n1\" is invalid: metadata.labels: Invalid value: \"bad key\""),
        "{}",
        status.message
    );

    // A missing Node: 404.
    let err = api
        .patch(
            "gone",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(err).code, 404);
    assert_eq!(
        fake.node("n1").unwrap().pointer("/metadata/annotations"),
        None
    );
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted() {
    let fake = fake_with(&["n1"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
    expect_initial_list(&mut stream, &["n1"]).await;

    fake.put_node(n("n2"));
    assert_eq!(describe(&next_event(&mut stream).await), "Apply(n2)");

    api.patch(
        "n1",
        &PatchParams::default(),
        &Patch::Strategic(json!({"metadata": {"annotations": {"k": "v"}}})),
    )
    .await
    .unwrap();
    match next_event(&mut stream).await {
        Event::Apply(node) => {
            assert_eq!(name_of(&node), "n1");
            assert_eq!(annotations(&node), [("k".into(), "v".into())]);
        }
        other => panic!("expected Apply(n1), got {}", describe(&other)),
    }

    fake.patch_annotations("n1", &[("k", None), ("other", Some("actor"))]);
    match next_event(&mut stream).await {
        Event::Apply(node) => assert_eq!(annotations(&node), [("other".into(), "actor".into())]),
        other => panic!("expected Apply(n1), got {}", describe(&other)),
    }

    let deleted = fake.delete_node("n2").unwrap();
    match next_event(&mut stream).await {
        Event::Delete(node) => {
            assert_eq!(name_of(&node), "n2");
            // The DELETED object carries the deletion's resourceVersion.
            assert_eq!(
                node.metadata.resource_version,
                deleted
                    .pointer("/metadata/resourceVersion")
                    .and_then(|v| v.as_str())
                    .map(String::from)
            );
            assert_eq!(
                node.metadata.resource_version,
                Some(fake.resource_version().to_string())
            );
        }
        other => panic!("expected Delete(n2), got {}", describe(&other)),
    }
    // One list, then watches from its resourceVersion with bookmarks.
    let requests = fake.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.verb == Some(Verb::List))
            .count(),
        1
    );
    let watch = requests
        .iter()
        .find(|r| r.verb == Some(Verb::Watch))
        .unwrap();
    assert!(
        watch.query.contains("allowWatchBookmarks=true"),
        "{}",
        watch.query
    );
}

#[tokio::test]
async fn streaming_list_watcher() {
    let fake = fake_with(&["n1", "n2"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);
    let mut stream = watcher::watcher(api, watcher::Config::default().streaming_lists()).boxed();
    expect_initial_list(&mut stream, &["n1", "n2"]).await;
    fake.put_node(n("n3"));
    assert_eq!(describe(&next_event(&mut stream).await), "Apply(n3)");
    let requests = fake.requests();
    assert!(requests.iter().all(|r| r.verb != Some(Verb::List)));
    assert!(
        requests
            .iter()
            .any(|r| r.query.contains("sendInitialEvents=true"))
    );
}

#[tokio::test]
async fn raw_watch_bookmarks_and_timeout() {
    let fake = FakeApiServer::start(FakeOptions {
        bookmark_interval: Duration::from_millis(200),
        ..FakeOptions::default()
    })
    .await;
    fake.put_node(n("n1"));
    let api: Api<Node> = Api::all(client(&fake).await);
    let from = fake.resource_version().to_string();

    let mut s = api
        .watch(&WatchParams::default().timeout(60), &from)
        .await
        .expect("watch")
        .boxed();
    fake.put_node(n("n2"));
    match within("ADDED", s.next()).await {
        Some(Ok(WatchEvent::Added(node))) => assert_eq!(name_of(&node), "n2"),
        other => panic!("expected ADDED n2, got {other:?}"),
    }
    // Periodic bookmarks, then one on demand.
    match within("periodic bookmark", s.next()).await {
        Some(Ok(WatchEvent::Bookmark(bm))) => {
            assert_eq!(
                bm.metadata.resource_version,
                fake.resource_version().to_string()
            );
            assert_eq!(
                (bm.types.kind.as_str(), bm.types.api_version.as_str()),
                ("Node", "v1")
            );
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    fake.patch_annotations("n1", &[("x", Some("y"))]);
    assert_eq!(fake.send_bookmarks(), 1);
    let mut saw_modified = false;
    loop {
        match within("bookmark after MODIFIED", s.next()).await {
            Some(Ok(WatchEvent::Modified(_))) => saw_modified = true,
            Some(Ok(WatchEvent::Bookmark(bm))) => {
                if saw_modified {
                    assert_eq!(
                        bm.metadata.resource_version,
                        fake.resource_version().to_string()
                    );
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(s);

    // A watch without bookmarks gets none, and timeoutSeconds ends the stream.
    let started = Instant::now();
    let mut s = api
        .watch(
            &WatchParams::default().disable_bookmarks().timeout(1),
            &fake.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    assert!(within("end of stream", s.next()).await.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));
    let watch = fake
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.verb == Some(Verb::Watch))
        .unwrap();
    assert!(!watch.query.contains("allowWatchBookmarks"));
}

#[tokio::test]
async fn raw_watch_from_compacted_version_gets_410_event() {
    let fake = fake_with(&["n1"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);
    let old = fake.resource_version();
    fake.put_node(n("n2"));
    let compacted = fake.compact();

    let mut s = api
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .expect("the real server answers 200 and puts the 410 in the stream")
        .boxed();
    match within("ERROR event", s.next()).await {
        Some(Ok(WatchEvent::Error(e))) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
            assert_eq!(
                e.message,
                format!("too old resource version: {old} ({compacted})")
            );
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(within("end of stream", s.next()).await.is_none());
    // From the compaction revision on, resuming works.
    let mut s = api
        .watch(&WatchParams::default(), &compacted.to_string())
        .await
        .unwrap()
        .boxed();
    fake.delete_node("n1");
    match within("DELETED", s.next()).await {
        Some(Ok(WatchEvent::Deleted(node))) => assert_eq!(name_of(&node), "n1"),
        other => panic!("expected DELETED n1, got {other:?}"),
    }
}

#[tokio::test]
async fn label_selected_watch_sees_nodes_leave_the_selection() {
    let fake = FakeApiServer::start(FakeOptions::default()).await;
    fake.put_node(n("cp").label("role", "cp"));
    fake.put_node(n("w").label("role", "worker"));
    let api: Api<Node> = Api::all(client(&fake).await);
    let mut s = api
        .watch(&WatchParams::default().labels("role=cp"), "0")
        .await
        .unwrap()
        .boxed();
    match within("ADDED", s.next()).await {
        Some(Ok(WatchEvent::Added(node))) => assert_eq!(name_of(&node), "cp"),
        other => panic!("expected ADDED cp, got {other:?}"),
    }
    fake.put_node(n("cp").label("role", "worker"));
    match within("DELETED", s.next()).await {
        Some(Ok(WatchEvent::Deleted(node))) => assert_eq!(name_of(&node), "cp"),
        other => panic!("expected DELETED cp, got {other:?}"),
    }
    fake.put_node(n("w").label("role", "cp"));
    match within("ADDED", s.next()).await {
        Some(Ok(WatchEvent::Added(node))) => assert_eq!(name_of(&node), "w"),
        other => panic!("expected ADDED w, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_resumes_after_a_dropped_stream_without_relisting() {
    let fake = fake_with(&["n1"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);
    let mut stream = spawn_watcher(watcher::watcher(api, watcher::Config::default()));
    expect_initial_list(&mut stream, &["n1"]).await;
    let list_rv = fake.resource_version();
    fake.wait_for_async(common::WAIT, |o| o.open_watches == 1)
        .await
        .expect("watch open");

    let cut = fake.drop_connections();
    assert!(cut >= 1);
    fake.put_node(n("n2"));
    assert_eq!(describe(&next_event(&mut stream).await), "Apply(n2)");

    let requests = fake.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.verb == Some(Verb::List))
            .count(),
        1,
        "no relist"
    );
    let watches: Vec<_> = requests
        .iter()
        .filter(|r| r.verb == Some(Verb::Watch))
        .collect();
    assert!(
        watches.len() >= 2,
        "the watch was restarted (cut {cut}): {requests:?}"
    );
    assert!(
        watches
            .iter()
            .all(|w| w.query.contains(&format!("resourceVersion={list_rv}")))
    );
}

#[tokio::test]
async fn watcher_relists_after_compaction() {
    let fake = fake_with(&["n1"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);
    let mut stream =
        spawn_watcher(watcher::watcher(api, watcher::Config::default()).default_backoff());
    expect_initial_list(&mut stream, &["n1"]).await;
    fake.wait_for_async(common::WAIT, |o| o.open_watches == 1)
        .await
        .expect("watch open");

    // Cut the watch and keep it out while the history moves on and is compacted.
    fake.set_refuse_connections(true);
    fake.drop_connections();
    fake.put_node(n("n2"));
    fake.compact();
    fake.set_refuse_connections(false);

    let mut saw_gone = false;
    let mut seen = Vec::new();
    loop {
        match within("relist", stream.next()).await {
            Some(Ok(ev)) => {
                let done = matches!(ev, Event::InitDone);
                seen.push(describe(&ev));
                if done {
                    break;
                }
            }
            Some(Err(watcher::Error::WatchError(e))) => {
                assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                saw_gone = true;
            }
            Some(Err(_)) => {}
            None => panic!("watcher ended"),
        }
    }
    assert!(saw_gone, "the resumed watch got 410 Gone");
    assert_eq!(seen, ["Init", "InitApply(n1)", "InitApply(n2)", "InitDone"]);
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|r| r.verb == Some(Verb::List))
            .count(),
        2
    );
}

#[tokio::test]
async fn unauthorized_and_forbidden_surface_as_api_errors() {
    let fake = fake_with(&["n1", "n2"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);

    // A token the fake does not know.
    let stranger: Api<Node> = Api::all(client_with_token(&fake, "not-the-token").await);
    let status = api_status(stranger.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        (status.code, status.reason.as_str(), status.message.as_str()),
        (401, "Unauthorized", "Unauthorized")
    );

    fake.set_auth(Verb::List, AuthMode::Unauthorized);
    let status = api_status(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(status.code, 401);

    // A kubelet credential on Kubernetes >= 1.32.
    fake.set_auth_all(AuthMode::NodeCredential { node: "n1".into() });
    let status = api_status(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "nodes is forbidden: User \"system:node:n1\" cannot list resource \"nodes\" in API group \"\" at the cluster scope: node 'n1' cannot read all nodes, only its own Node object"
    );
    let own = api
        .list(&ListParams::default().fields("metadata.name=n1"))
        .await
        .unwrap();
    assert_eq!(own.items.len(), 1);
    let status = api_status(api.get("n2").await.unwrap_err());
    assert_eq!(
        status.message,
        "nodes \"n2\" is forbidden: User \"system:node:n1\" cannot get resource \"nodes\" in API group \"\" at the cluster scope: node 'n1' cannot read 'n2', only its own Node object"
    );
    api.get("n1").await.expect("a node may read its own Node");
    let status = api_status(
        api.patch(
            "n2",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code, 403);
    assert_eq!(
        status.message,
        "nodes \"n2\" is forbidden: node \"n1\" is not allowed to modify node \"n2\""
    );
    api.patch(
        "n1",
        &PatchParams::default(),
        &Patch::Strategic(json!({"metadata": {"annotations": {"a": "b"}}})),
    )
    .await
    .expect("a node may patch its own Node");

    // The watcher reports the 403 of its initial list (after its `Init`).
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        within("Init", stream.next()).await,
        Some(Ok(Event::Init))
    ));
    match within("watcher error", stream.next()).await {
        Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))) => {
            assert_eq!(s.code, 403)
        }
        other => panic!("expected InitialListFailed(403), got {other:?}"),
    }

    fake.set_auth(
        Verb::Watch,
        AuthMode::Forbidden {
            user: "alice".into(),
        },
    );
    let status = api_status(api.watch(&WatchParams::default(), "0").await.err().unwrap());
    assert_eq!(
        status.message,
        "nodes is forbidden: User \"alice\" cannot watch resource \"nodes\" in API group \"\" at the cluster scope"
    );
}

#[tokio::test]
async fn unknown_paths_and_discovery() {
    let fake = fake_with(&["n1"]).await;
    let client = client(&fake).await;
    let req = http::Request::get("/api/v1/pods").body(Vec::new()).unwrap();
    let status = api_status(client.request::<serde_json::Value>(req).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(
        status.message,
        "the server could not find the requested resource"
    );

    let version = client.apiserver_version().await.expect("/version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "32")
    );
    let resources = client.list_core_api_resources("v1").await.expect("/api/v1");
    let names: Vec<&str> = resources
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["nodes"]);
}

#[tokio::test]
async fn slow_responses_and_restart_on_the_same_port() {
    let fake = fake_with(&["n1"]).await;
    let api: Api<Node> = Api::all(client(&fake).await);

    fake.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    api.get("n1").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    fake.set_delay(Duration::ZERO);

    let addr = fake.addr();
    fake.stop();
    assert!(!fake.is_running());
    let err = api.get("n1").await.unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "no answer while down: {err:?}"
    );
    std::net::TcpStream::connect(addr).expect_err("connections are refused while stopped");

    fake.put_node(n("n2"));
    fake.restart().expect("restart");
    assert_eq!(fake.addr(), addr);
    let list = api
        .list(&ListParams::default())
        .await
        .expect("list after restart");
    assert_eq!(
        list.items.iter().map(name_of).collect::<Vec<_>>(),
        ["n1", "n2"]
    );
}

/// The fake from a plain `#[test]`: `start_blocking`, and the blocking `wait_for`.
#[test]
fn usable_from_synchronous_tests() {
    let fake = FakeApiServer::start_blocking(FakeOptions::default());
    fake.put_node(n("n1"));
    let from = fake.resource_version().to_string();
    let kubeconfig = fake.kubeconfig();
    let token = fake.token().to_string();
    assert!(kubeconfig.contains(&format!("token: {token}")));
    assert!(kubeconfig.contains(&format!("server: {}", fake.url())));
    let watcher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            common::install_crypto();
            let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            let api: Api<Node> = Api::all(kube::Client::try_from(config).unwrap());
            let mut s = api
                .watch(&WatchParams::default(), &from)
                .await
                .unwrap()
                .boxed();
            match within("ADDED", s.next()).await {
                Some(Ok(WatchEvent::Added(node))) => name_of(&node),
                other => panic!("expected ADDED, got {other:?}"),
            }
        })
    });
    fake.wait_for(common::WAIT, |o| o.open_watches == 1)
        .expect("the watch opened");
    fake.put_node(n("n2"));
    assert_eq!(watcher.join().unwrap(), "n2");
    let closed = fake.wait_for(common::WAIT, |o| o.open_watches == 0);
    assert!(closed.is_ok(), "the watch closed when the client went away");
}

/// Wire details a typed client hides: list shape, option validation, content types.
#[tokio::test]
async fn raw_wire_shapes_and_option_checks() {
    let fake = fake_with(&["n1", "n2"]).await;
    let client = client(&fake).await;
    let get = |uri: &str| http::Request::get(uri).body(Vec::new()).unwrap();

    // NodeList: typed list metadata; items carry no kind/apiVersion.
    let list: serde_json::Value = client.request(get("/api/v1/nodes")).await.unwrap();
    assert_eq!(list["kind"], "NodeList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        fake.resource_version().to_string()
    );
    assert!(list["items"][0].get("kind").is_none());
    assert_eq!(list["items"][0]["metadata"]["name"], "n1");
    // A single GET does carry them.
    let node: serde_json::Value = client.request(get("/api/v1/nodes/n1")).await.unwrap();
    assert_eq!(
        (node["kind"].as_str(), node["apiVersion"].as_str()),
        (Some("Node"), Some("v1"))
    );

    // watch=1 is a watch too; from "0" it starts with the current Nodes.
    let events = client
        .request_events::<Node>(get(
            "/api/v1/nodes?watch=1&resourceVersion=0&timeoutSeconds=5",
        ))
        .await
        .unwrap();
    let mut events = std::pin::pin!(events);
    use futures::TryStreamExt;
    for want in ["n1", "n2"] {
        match within("ADDED", events.try_next()).await {
            Ok(Some(WatchEvent::Added(node))) => assert_eq!(name_of(&node), want),
            other => panic!("expected ADDED {want}, got {other:?}"),
        }
    }

    let failure = |r: Result<serde_json::Value, kube::Error>| api_status(r.unwrap_err());
    let s = failure(
        client
            .request(get("/api/v1/nodes?resourceVersionMatch=Exact"))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        s.message,
        "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"
    );
    let s = failure(
        client
            .request(get("/api/v1/nodes?fieldSelector=status.phase%3DRunning"))
            .await,
    );
    assert_eq!(
        (s.code, s.message.as_str()),
        (400, "field label not supported: status.phase")
    );
    // kube retries a 504 (by default for minutes); ask once.
    let once = common::client_without_retry(&fake).await;
    let s = failure(
        once.request(get(
            "/api/v1/nodes?resourceVersion=999999&resourceVersionMatch=NotOlderThan",
        ))
        .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (504, "Timeout"));
    assert!(
        s.message.starts_with("Too large resource version: 999999"),
        "{}",
        s.message
    );

    let old = fake.resource_version();
    fake.put_node(n("n3"));
    let at_old: serde_json::Value = client
        .request(get(&format!(
            "/api/v1/nodes?resourceVersion={old}&resourceVersionMatch=Exact"
        )))
        .await
        .unwrap();
    assert_eq!(
        at_old["items"].as_array().unwrap().len(),
        2,
        "the list as of {old}"
    );
    fake.compact();
    let s = failure(
        client
            .request(get(&format!(
                "/api/v1/nodes?resourceVersion={old}&resourceVersionMatch=Exact"
            )))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));

    let patch = |ct: &str| {
        http::Request::patch("/api/v1/nodes/n1")
            .header("Content-Type", ct)
            .body(br#"{"metadata":{"annotations":{"a":"b"}}}"#.to_vec())
            .unwrap()
    };
    let s = failure(client.request(patch("text/plain")).await);
    assert_eq!((s.code, s.reason.as_str()), (415, "UnsupportedMediaType"));
    let ok: serde_json::Value = client
        .request(patch("application/merge-patch+json; charset=utf-8"))
        .await
        .unwrap();
    assert_eq!(ok["metadata"]["annotations"]["a"], "b");
    let json_patch = http::Request::patch("/api/v1/nodes/n1")
        .header("Content-Type", "application/json-patch+json")
        .body(br#"[{"op":"remove","path":"/metadata/annotations/a"}]"#.to_vec())
        .unwrap();
    let ok: serde_json::Value = client.request(json_patch).await.unwrap();
    assert!(ok["metadata"].get("annotations").is_none());
    let delete = http::Request::delete("/api/v1/nodes/n1")
        .body(Vec::new())
        .unwrap();
    let s = failure(client.request(delete).await);
    assert_eq!(s.code, 405);
}
