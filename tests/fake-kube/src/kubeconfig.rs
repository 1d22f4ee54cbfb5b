//! The kubeconfig a client needs to reach the fake.

use base64::Engine;

/// A kubeconfig with one cluster (`certificate-authority-data`), one user (`token`) and one
/// context, current. Names are `fake-kube` (cluster, context) and `fake-kube-user` (user).
pub(crate) fn render(server: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake-kube
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: fake-kube-user
  user:
    token: {token}
contexts:
- name: fake-kube
  context:
    cluster: fake-kube
    user: fake-kube-user
current-context: fake-kube
preferences: {{}}
"
    )
}
