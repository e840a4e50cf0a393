//! Artifact retention: which artifacts may be deleted under a policy.
