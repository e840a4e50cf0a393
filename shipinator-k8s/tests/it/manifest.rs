//! Snapshots of generated Job manifests.

use std::collections::BTreeMap;
use std::time::Duration;

use expect_test::expect;
use shipinator_core::domain::{ExecutionId, JobId, JobType, RunId, StepId};
use shipinator_core::executor::{ExecutionSpec, WorkspaceRef};
use shipinator_k8s::{
    K8sConfig, Resources, TargetConfig, Toleration, WorkspaceVolume, job_manifest,
};

fn fixed_spec(stage: JobType) -> anyhow::Result<ExecutionSpec> {
    let run_id: RunId = "01900000-0000-7000-8000-000000000001".parse()?;
    let job_id = JobId::derive(run_id, stage);
    let step_id = StepId::derive(job_id, 0);
    Ok(ExecutionSpec {
        execution_id: ExecutionId::derive(step_id, 2),
        run_id,
        job_id,
        step_id,
        attempt: 2,
        stage,
        step_name: "compile".to_owned(),
        image: Some("rust:1.89".to_owned()),
        command: vec!["sh".to_owned(), "-c".to_owned(), "cargo build".to_owned()],
        env: BTreeMap::from([("SHIPINATOR_RUN_ID".to_owned(), run_id.to_string())]),
        workdir: None,
        timeout: Some(Duration::from_secs(1200)),
        workspace: WorkspaceRef::for_stage(run_id, stage),
        source: None,
        inputs: Vec::new(),
        outputs: Vec::new(),
    })
}

fn config() -> K8sConfig {
    K8sConfig {
        namespace: "ci".to_owned(),
        worker_image: "registry.example/shipinator-worker:1".to_owned(),
        callback_url: "http://shipinator.ci.svc:8080".to_owned(),
        resources: Resources {
            requests: BTreeMap::from([("cpu".to_owned(), "500m".to_owned())]),
            limits: BTreeMap::from([("memory".to_owned(), "2Gi".to_owned())]),
        },
        node_selector: BTreeMap::from([("pool".to_owned(), "ci".to_owned())]),
        tolerations: vec![Toleration {
            key: Some("dedicated".to_owned()),
            operator: Some("Equal".to_owned()),
            value: Some("ci".to_owned()),
            effect: Some("NoSchedule".to_owned()),
        }],
        service_account: Some("shipinator-builds".to_owned()),
        workspace: Some(WorkspaceVolume {
            claim_name: "shipinator-workspaces".to_owned(),
            sub_path_prefix: "workspaces".to_owned(),
        }),
        deadline_grace: Duration::from_secs(300),
        targets: BTreeMap::from([(
            "local".to_owned(),
            TargetConfig {
                namespaces: vec!["staging".to_owned()],
                service_account: Some("deployer".to_owned()),
            },
        )]),
        ..K8sConfig::default()
    }
}

/// Drops the long spec JSON so the snapshot stays readable; it is checked separately.
fn pretty(job: &k8s_openapi::api::batch::v1::Job) -> anyhow::Result<String> {
    let mut v = serde_json::to_value(job)?;
    if let Some(env) = v["spec"]["template"]["spec"]["containers"][0]["env"].as_array_mut() {
        for e in env {
            if e["name"] == "SHIPINATOR_EXECUTION_SPEC" {
                e["value"] = serde_json::json!("<spec json>");
            }
        }
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

#[test]
fn build_job_manifest() -> anyhow::Result<()> {
    let spec = fixed_spec(JobType::Build)?;
    let job = job_manifest(&config(), &spec, Some("tok-123"))?;
    expect![[r#"
        {
          "apiVersion": "batch/v1",
          "kind": "Job",
          "metadata": {
            "annotations": {
              "shipinator.dev/execution-id": "80b5e8f5-3efa-56cf-b77a-9682db8c6723"
            },
            "labels": {
              "app.kubernetes.io/managed-by": "shipinator",
              "shipinator.dev/attempt": "2",
              "shipinator.dev/execution": "80b5e8f5-3efa-56cf-b77a-9682db8c6723",
              "shipinator.dev/job": "6a3b5d0f-529a-529e-a221-70a758c88ee8",
              "shipinator.dev/run": "01900000-0000-7000-8000-000000000001",
              "shipinator.dev/step": "2cb346c2-67dc-536f-80b7-c42e040a2c8c"
            },
            "name": "shipinator-80b5e8f5-3efa-56cf-b77a-9682db8c6723",
            "namespace": "ci"
          },
          "spec": {
            "activeDeadlineSeconds": 1500,
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "template": {
              "metadata": {
                "annotations": {
                  "shipinator.dev/execution-id": "80b5e8f5-3efa-56cf-b77a-9682db8c6723"
                },
                "labels": {
                  "app.kubernetes.io/managed-by": "shipinator",
                  "shipinator.dev/attempt": "2",
                  "shipinator.dev/execution": "80b5e8f5-3efa-56cf-b77a-9682db8c6723",
                  "shipinator.dev/job": "6a3b5d0f-529a-529e-a221-70a758c88ee8",
                  "shipinator.dev/run": "01900000-0000-7000-8000-000000000001",
                  "shipinator.dev/step": "2cb346c2-67dc-536f-80b7-c42e040a2c8c"
                }
              },
              "spec": {
                "automountServiceAccountToken": false,
                "containers": [
                  {
                    "command": [
                      "/shipinator/bin/shipinator",
                      "worker",
                      "--execution",
                      "80b5e8f5-3efa-56cf-b77a-9682db8c6723"
                    ],
                    "env": [
                      {
                        "name": "SHIPINATOR_RUN_ID",
                        "value": "01900000-0000-7000-8000-000000000001"
                      },
                      {
                        "name": "SHIPINATOR_SERVER",
                        "value": "http://shipinator.ci.svc:8080"
                      },
                      {
                        "name": "SHIPINATOR_EXECUTION_TOKEN",
                        "value": "tok-123"
                      },
                      {
                        "name": "SHIPINATOR_WORKSPACE",
                        "value": "/workspaces/01900000-0000-7000-8000-000000000001/build"
                      },
                      {
                        "name": "SHIPINATOR_RESULT_FILE",
                        "value": "/dev/termination-log"
                      },
                      {
                        "name": "SHIPINATOR_EXECUTION_SPEC",
                        "value": "<spec json>"
                      }
                    ],
                    "image": "rust:1.89",
                    "name": "step",
                    "resources": {
                      "limits": {
                        "memory": "2Gi"
                      },
                      "requests": {
                        "cpu": "500m"
                      }
                    },
                    "volumeMounts": [
                      {
                        "mountPath": "/shipinator/bin",
                        "name": "shipinator-bin"
                      },
                      {
                        "mountPath": "/workspaces/01900000-0000-7000-8000-000000000001",
                        "name": "workspace",
                        "subPath": "workspaces/01900000-0000-7000-8000-000000000001"
                      }
                    ],
                    "workingDir": "/workspaces/01900000-0000-7000-8000-000000000001"
                  }
                ],
                "initContainers": [
                  {
                    "command": [
                      "cp",
                      "/usr/local/bin/shipinator",
                      "/shipinator/bin/shipinator"
                    ],
                    "image": "registry.example/shipinator-worker:1",
                    "name": "install-worker",
                    "volumeMounts": [
                      {
                        "mountPath": "/shipinator/bin",
                        "name": "shipinator-bin"
                      }
                    ]
                  }
                ],
                "nodeSelector": {
                  "pool": "ci"
                },
                "restartPolicy": "Never",
                "serviceAccountName": "shipinator-builds",
                "tolerations": [
                  {
                    "effect": "NoSchedule",
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "ci"
                  }
                ],
                "volumes": [
                  {
                    "emptyDir": {},
                    "name": "shipinator-bin"
                  },
                  {
                    "name": "workspace",
                    "persistentVolumeClaim": {
                      "claimName": "shipinator-workspaces"
                    }
                  }
                ]
              }
            },
            "ttlSecondsAfterFinished": 3600
          }
        }"#]]
    .assert_eq(&pretty(&job)?);
    let env = &job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers[0].env.clone());
    let spec_json = env
        .iter()
        .flatten()
        .flatten()
        .find(|e| e.name == "SHIPINATOR_EXECUTION_SPEC")
        .and_then(|e| e.value.clone())
        .unwrap_or_default();
    let back: ExecutionSpec = serde_json::from_str(&spec_json)?;
    assert_eq!(back, spec, "the worker gets the spec back unchanged");
    Ok(())
}

#[test]
fn deploy_job_uses_the_target_service_account() -> anyhow::Result<()> {
    let mut spec = fixed_spec(JobType::Deploy)?;
    spec.image = None;
    spec.env
        .insert("SHIPINATOR_DEPLOY_TARGET".to_owned(), "local".to_owned());
    spec.env.insert(
        "SHIPINATOR_DEPLOY_NAMESPACE".to_owned(),
        "staging".to_owned(),
    );
    let mut cfg = config();
    cfg.deploy_image = Some("registry.example/deployer:3".to_owned());
    let job = job_manifest(&cfg, &spec, None)?;
    let pod = job.spec.and_then(|s| s.template.spec).unwrap_or_default();
    assert_eq!(pod.service_account_name.as_deref(), Some("deployer"));
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.example/deployer:3")
    );

    spec.env.insert(
        "SHIPINATOR_DEPLOY_NAMESPACE".to_owned(),
        "kube-system".to_owned(),
    );
    let err = job_manifest(&cfg, &spec, None).err().map(|e| e.to_string());
    expect![[r#"
        Some(
            "execution 3414f5a9-7e4e-58f5-b37f-d45011abd746 rejected: namespace 'kube-system' is not allowed for target 'local' (targets.local.namespaces: [\"staging\"])",
        )
    "#]].assert_debug_eq(&err);

    spec.env
        .insert("SHIPINATOR_DEPLOY_TARGET".to_owned(), "prod".to_owned());
    let err = job_manifest(&cfg, &spec, None).err().map(|e| e.to_string());
    expect![[r#"
        Some(
            "execution 3414f5a9-7e4e-58f5-b37f-d45011abd746 rejected: deploy target 'prod' is not configured (no [targets.prod])",
        )
    "#]].assert_debug_eq(&err);
    Ok(())
}

#[test]
fn a_step_without_image_is_rejected() -> anyhow::Result<()> {
    let mut spec = fixed_spec(JobType::Test)?;
    spec.image = None;
    let err = job_manifest(&config(), &spec, None)
        .err()
        .map(|e| e.to_string());
    expect![[r#"
        Some(
            "execution 2f066651-2025-5973-abd1-384674438c82 rejected: the step names no image and no default is configured",
        )
    "#]].assert_debug_eq(&err);
    Ok(())
}

#[test]
fn config_reads_from_the_documented_shape() -> anyhow::Result<()> {
    let cfg: K8sConfig = serde_json::from_value(serde_json::json!({
        "cluster": {"source": "kubeconfig", "path": "/etc/kube/config", "context": "ci"},
        "namespace": "builds",
        "worker_image": "registry.example/shipinator-worker:1",
        "resources": {"requests": {"cpu": "500m"}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ci", "effect": "NoSchedule"}],
        "workspace": {"claim_name": "shipinator-workspaces"},
        "image_pull_bound": 120,
        "max_requests_per_second": 50,
        "targets": {"local": {"namespaces": ["staging"], "service_account": "deployer"}}
    }))?;
    assert_eq!(cfg.namespace, "builds");
    assert_eq!(cfg.image_pull_bound, Duration::from_secs(120));
    assert_eq!(cfg.deadline_grace, K8sConfig::default().deadline_grace);
    assert_eq!(
        cfg.targets.get("local").map(|t| t.namespaces.clone()),
        Some(vec!["staging".to_owned()])
    );
    Ok(())
}

/// Every file in the repository's `deploy/` parses into its Kubernetes type, and the executor
/// role grants what the executor calls.
#[test]
fn deploy_manifests_parse_into_their_types() -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{
        ConfigMap, Namespace, PersistentVolumeClaim, Service, ServiceAccount,
    };
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut kinds = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    for path in paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let value: serde_json::Value = serde_saphyr::from_str(&std::fs::read_to_string(path)?)?;
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let parsed = match kind.as_str() {
            "Namespace" => serde_json::from_value::<Namespace>(value).map(drop),
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(value).map(drop),
            "PersistentVolumeClaim" => {
                serde_json::from_value::<PersistentVolumeClaim>(value).map(drop)
            }
            "RoleBinding" => serde_json::from_value::<RoleBinding>(value).map(drop),
            "Deployment" => serde_json::from_value::<Deployment>(value).map(drop),
            "Service" => serde_json::from_value::<Service>(value).map(drop),
            // The server's configuration; shipinator-server's tests parse its server.toml.
            "ConfigMap" => serde_json::from_value::<ConfigMap>(value).map(|cm| {
                assert!(cm.data.iter().flatten().any(|(k, _)| k == "server.toml"));
            }),
            "Role" => serde_json::from_value::<Role>(value.clone()).map(|role| {
                if role.metadata.name.as_deref() != Some("shipinator-executor") {
                    return;
                }
                let grants = |group: &str, resource: &str, verb: &str| {
                    role.rules.iter().flatten().any(|r| {
                        r.api_groups.iter().flatten().any(|g| g == group)
                            && r.resources.iter().flatten().any(|x| x == resource)
                            && r.verbs.iter().any(|v| v == verb)
                    })
                };
                for verb in ["create", "get", "list", "watch", "delete"] {
                    assert!(grants("batch", "jobs", verb), "jobs {verb}");
                }
                for verb in ["get", "list", "watch"] {
                    assert!(grants("", "pods", verb), "pods {verb}");
                }
                assert!(grants("", "pods/log", "get"));
            }),
            other => anyhow::bail!("{}: unexpected kind {other}", path.display()),
        };
        parsed.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        kinds.push(kind);
    }
    expect![[r#"
        [
            "Namespace",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ServiceAccount",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "ConfigMap",
            "Deployment",
            "Service",
        ]
    "#]]
    .assert_debug_eq(&kinds);
    Ok(())
}

/// Every object of `deploy/`, with the name of its file.
fn deploy_objects() -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((
                name,
                serde_saphyr::from_str(&std::fs::read_to_string(&path)?)?,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn of_kind<T: serde::de::DeserializeOwned>(
    objects: &[(String, serde_json::Value)],
    kind: &str,
) -> anyhow::Result<Vec<T>> {
    objects
        .iter()
        .filter(|(_, o)| o["kind"] == kind)
        .map(|(file, o)| {
            serde_json::from_value(o.clone()).map_err(|e| anyhow::anyhow!("deploy/{file}: {e}"))
        })
        .collect()
}

/// The `kubectl create secret generic NAME ... --from-*=KEY...` lines of deploy/README.md: the
/// Secrets are documented, never committed.
fn documented_secret(readme: &str, name: &str, key: &str) -> bool {
    readme.lines().any(|l| {
        l.contains(&format!("create secret generic {name} "))
            && (l.contains(&format!("={key}=")) || l.contains(&format!("={key} ")))
    })
}

/// The references between the objects of `deploy/` and the server configuration they carry,
/// so that renaming one side without the other fails here.
#[test]
#[allow(clippy::too_many_lines)] // one walk over the Deployment's references
fn deploy_objects_refer_to_each_other() -> anyhow::Result<()> {
    use anyhow::Context;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let objects = deploy_objects()?;
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md"),
    )?;
    let config_maps: Vec<ConfigMap> = of_kind(&objects, "ConfigMap")?;
    let claims: Vec<PersistentVolumeClaim> = of_kind(&objects, "PersistentVolumeClaim")?;
    let accounts: Vec<ServiceAccount> = of_kind(&objects, "ServiceAccount")?;
    let roles: Vec<Role> = of_kind(&objects, "Role")?;
    let bindings: Vec<RoleBinding> = of_kind(&objects, "RoleBinding")?;
    let [deployment]: [Deployment; 1] = of_kind(&objects, "Deployment")?
        .try_into()
        .map_err(|d: Vec<_>| anyhow::anyhow!("{} Deployments in deploy/", d.len()))?;
    let [service]: [Service; 1] = of_kind(&objects, "Service")?
        .try_into()
        .map_err(|s: Vec<_>| anyhow::anyhow!("{} Services in deploy/", s.len()))?;

    let ns = deployment.metadata.namespace.clone().context("namespace")?;
    let in_ns = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, name: &str| {
        meta.namespace.as_deref() == Some(ns.as_str()) && meta.name.as_deref() == Some(name)
    };
    let spec = deployment.spec.as_ref().context("Deployment spec")?;
    assert_eq!(spec.replicas, Some(2));
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selects = |selector: &std::collections::BTreeMap<String, String>| {
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(selects(
        spec.selector.match_labels.as_ref().context("matchLabels")?
    ));
    let pod = spec.template.spec.as_ref().context("pod spec")?;

    // The server's identity exists and holds the executor's role.
    let account = pod
        .service_account_name
        .as_deref()
        .context("serviceAccountName")?;
    assert!(
        accounts.iter().any(|a| in_ns(&a.metadata, account)),
        "{account}"
    );
    let bound_roles = |subject: &str| -> Vec<String> {
        bindings
            .iter()
            .filter(|b| b.metadata.namespace.as_deref() == Some(ns.as_str()))
            .filter(|b| {
                b.subjects.iter().flatten().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == subject
                        && s.namespace.as_deref() == Some(ns.as_str())
                })
            })
            .map(|b| b.role_ref.name.clone())
            .collect()
    };
    assert!(bound_roles(account).contains(&"shipinator-executor".to_owned()));

    let [container] = pod.containers.as_slice() else {
        anyhow::bail!("the server pod has {} containers", pod.containers.len());
    };
    // scripts/k8s-manifest.sh replaces exactly this reference with the built image's digest.
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/shipinator:latest")
    );
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|m| m.name == volume)
            .map(|m| m.mount_path.clone())
    };

    // Every volume names an object of deploy/ or a documented Secret.
    let mut config_mount = None;
    let mut secret_mount = None;
    let mut shared_mounts = Vec::new();
    let mut scratch_mounts = Vec::new();
    for volume in pod.volumes.iter().flatten() {
        let mount = mount_of(&volume.name)
            .with_context(|| format!("volume {} is not mounted", volume.name))?;
        if let Some(cm) = &volume.config_map {
            let found = config_maps
                .iter()
                .find(|c| in_ns(&c.metadata, &cm.name))
                .with_context(|| format!("ConfigMap {} is not in deploy/", cm.name))?;
            config_mount = Some((mount, found.clone()));
        } else if let Some(pvc) = &volume.persistent_volume_claim {
            let claim = claims
                .iter()
                .find(|c| in_ns(&c.metadata, &pvc.claim_name))
                .with_context(|| format!("claim {} is not in deploy/", pvc.claim_name))?;
            let modes = claim.spec.as_ref().and_then(|s| s.access_modes.clone());
            assert_eq!(
                modes,
                Some(vec!["ReadWriteMany".to_owned()]),
                "{}",
                pvc.claim_name
            );
            shared_mounts.push(mount);
        } else if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().context("secretName")?;
            secret_mount = Some((mount, name));
        } else if volume.empty_dir.is_some() {
            scratch_mounts.push(mount);
        } else {
            anyhow::bail!("volume {}: unexpected source", volume.name);
        }
    }

    // The configuration the container reads is the ConfigMap's.
    let (config_dir, config_map) = config_mount.context("no ConfigMap volume")?;
    let args = container.args.clone().unwrap_or_default();
    let [serve, flag, config_path] = args.as_slice() else {
        anyhow::bail!("args {args:?}");
    };
    assert_eq!((serve.as_str(), flag.as_str()), ("serve", "--config"));
    let key = config_path
        .strip_prefix(&format!("{config_dir}/"))
        .with_context(|| format!("{config_path} is not in the ConfigMap's mount {config_dir}"))?;
    let toml_text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .with_context(|| format!("the ConfigMap has no key {key}"))?;
    let server: toml::Table = toml::from_str(toml_text)?;
    let str_at = |path: &[&str]| -> Option<String> {
        let mut v = server.get(path[0])?;
        for p in &path[1..] {
            v = v.get(p)?;
        }
        v.as_str().map(str::to_owned)
    };
    let under = |path: &str, dirs: &[String]| {
        dirs.iter()
            .any(|d| path == d || path.starts_with(&format!("{d}/")))
    };

    // Shared state on the ReadWriteMany claim; the rest writable despite a read-only root.
    for key in [["artifacts", "path"], ["logs", "path"]] {
        let path = str_at(&key).with_context(|| format!("server.toml has no {}", key.join(".")))?;
        assert!(under(&path, &shared_mounts), "{}: {path}", key.join("."));
    }
    let data_dir = str_at(&["data_dir"]).context("data_dir")?;
    assert!(under(&data_dir, &scratch_mounts), "data_dir {data_dir}");
    assert!(under("/tmp", &scratch_mounts), "/tmp");

    // The server secret every replica shares, and the database URL, from documented Secrets.
    let secret_file = str_at(&["auth", "secret_file"]).context("auth.secret_file")?;
    let (secret_dir, secret_name) = secret_mount.context("no Secret volume")?;
    let secret_key = secret_file
        .strip_prefix(&format!("{secret_dir}/"))
        .with_context(|| format!("{secret_file} is not in the Secret's mount {secret_dir}"))?;
    assert!(
        documented_secret(&readme, &secret_name, secret_key),
        "deploy/README.md does not say how to create Secret {secret_name} with key {secret_key}"
    );
    let database = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "SHIPINATOR_DATABASE__URL")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .context("SHIPINATOR_DATABASE__URL from a Secret")?;
    assert!(
        documented_secret(&readme, &database.name, &database.key),
        "deploy/README.md does not say how to create Secret {} with key {}",
        database.name,
        database.key
    );

    // Shutdown: the server stops within shutdown_timeout_secs, before the kubelet kills it.
    let shutdown = server
        .get("shutdown_timeout_secs")
        .and_then(toml::Value::as_integer)
        .unwrap_or(20);
    let grace = pod
        .termination_grace_period_seconds
        .context("grace period")?;
    assert!(
        grace > shutdown,
        "grace {grace} s <= shutdown_timeout_secs {shutdown}"
    );

    // Non-root, read-only root filesystem, no privilege escalation.
    let pod_security = pod
        .security_context
        .as_ref()
        .context("pod securityContext")?;
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert!(pod_security.run_as_user.is_some_and(|u| u != 0));
    let security = container
        .security_context
        .as_ref()
        .context("securityContext")?;
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));

    // Probes on the port the server listens on.
    let listen = str_at(&["listen"]).context("listen")?;
    let listen_port: i32 = listen.rsplit(':').next().unwrap_or_default().parse()?;
    let http = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .context("a port named http")?;
    assert_eq!(http.container_port, listen_port);
    for (probe, path) in [
        (&container.readiness_probe, "/readyz"),
        (&container.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .with_context(|| format!("probe of {path}"))?;
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("http".to_owned()));
    }

    // The Service is what public_url names, and it reaches these pods.
    let public_url = str_at(&["public_url"]).context("public_url")?;
    let authority = public_url
        .strip_prefix("http://")
        .context("public_url over http")?;
    let (host, port) = authority.split_once(':').context("public_url has a port")?;
    let mut labels = host.split('.');
    assert_eq!(labels.next(), service.metadata.name.as_deref());
    assert_eq!(labels.next(), Some(ns.as_str()));
    assert_eq!(labels.next(), Some("svc"));
    let service_spec = service.spec.as_ref().context("Service spec")?;
    assert!(selects(
        service_spec.selector.as_ref().context("Service selector")?
    ));
    let port: i32 = port.trim_end_matches('/').parse()?;
    let service_port = service_spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == port)
        .with_context(|| format!("the Service has no port {port}"))?;
    assert_eq!(
        service_port.target_port,
        Some(IntOrString::String("http".to_owned()))
    );

    // The self-deploy: the default target allows this namespace, and its identity may apply
    // every object of the files the deploy stage renders (30 and up), and nothing else.
    let target = server
        .get("targets")
        .and_then(|t| t.get("local"))
        .context("[targets.local]")?;
    let namespaces: Vec<&str> = target
        .get("namespaces")
        .and_then(toml::Value::as_array)
        .context("targets.local.namespaces")?
        .iter()
        .filter_map(toml::Value::as_str)
        .collect();
    assert!(namespaces.contains(&ns.as_str()), "{namespaces:?}");
    let deployer = target
        .get("service_account")
        .and_then(toml::Value::as_str)
        .context("targets.local.service_account")?;
    assert!(
        accounts.iter().any(|a| in_ns(&a.metadata, deployer)),
        "{deployer}"
    );
    let deployer_roles = bound_roles(deployer);
    let grants = |group: &str, resource: &str, verb: &str| {
        roles
            .iter()
            .filter(|r| {
                r.metadata.namespace.as_deref() == Some(ns.as_str())
                    && deployer_roles
                        .iter()
                        .any(|n| r.metadata.name.as_ref() == Some(n))
            })
            .flat_map(|r| r.rules.iter().flatten())
            .any(|rule| {
                rule.api_groups.iter().flatten().any(|g| g == group)
                    && rule.resources.iter().flatten().any(|x| x == resource)
                    && rule.verbs.iter().any(|v| v == verb)
            })
    };
    let rendered: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|(file, _)| file.as_str() >= "30")
        .map(|(_, o)| o)
        .collect();
    for object in &rendered {
        assert_eq!(object["metadata"]["namespace"], ns.as_str(), "{object}");
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let resource = format!(
            "{}s",
            object["kind"].as_str().unwrap_or_default().to_lowercase()
        );
        for verb in ["get", "create", "patch"] {
            assert!(
                grants(group, &resource, verb),
                "deployer: {verb} {resource}"
            );
        }
    }
    for (group, resource) in [("rbac.authorization.k8s.io", "roles"), ("", "secrets")] {
        for verb in ["get", "create", "patch"] {
            assert!(
                !grants(group, resource, verb),
                "deployer may {verb} {resource}"
            );
        }
    }
    Ok(())
}
