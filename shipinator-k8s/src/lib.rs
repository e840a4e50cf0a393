//! Shipinator k8s adapter (skeleton: filled in by its issue).
