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
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, ServiceAccount};
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
            // The server's configuration; shipinator-server's tests parse its server.toml.
            "ConfigMap" => serde_json::from_value::<ConfigMap>(value).map(|cm| {
                assert!(cm.data.iter().flatten().any(|(k, _)| k == "server.toml"));
            }),
            "Role" => serde_json::from_value::<Role>(value.clone()).map(|role| {
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
            "PersistentVolumeClaim",
            "ConfigMap",
        ]
    "#]]
    .assert_debug_eq(&kinds);
    Ok(())
}
