"""The Kubernetes run launcher: one batch/v1 Job per run attempt, through kubernetes_asyncio.

Config (``run_launcher.config``; validated when the launcher is built, an unknown key or a wrong
type raises ConfigError naming the key):

==============================  ===========================================================
image (required)                the worker's image
command                         worker command; ``WorkerRun.command`` wins when not None
                                (default ``["runherd", "worker"]``)
namespace                       where the Jobs go (default ``default``)
service_account_name            the pods' service account
env                             {name: value}, under the run's own env
env_from_secrets                [secret name] -> ``envFrom: secretRef``
resources                       {requests: {...}, limits: {...}}
image_pull_secrets              [secret name]
image_pull_policy               Always | IfNotPresent | Never
node_selector, tolerations      as in a pod spec
labels                          extra labels on Job and pod (runherd's own labels win)
ttl_seconds_after_finished      default 3600; null: keep finished Jobs
termination_grace_seconds       the pods' terminationGracePeriodSeconds (default: Kubernetes')
load_incluster_config           use the pod's service account (default false)
kubeconfig_file, context        which kubeconfig and context (default ``~/.kube/config``)
api_url                         overrides the API server URL (tests, proxies)
launch_retries                  retries of a transient create failure (default 3)
retry_backoff_seconds           first retry delay, doubled each time (default 0.5)
request_timeout_seconds         per API call (default 30)
watch_timeout_seconds           server-side timeout of one watch request (default 300)
log_tail_lines                  lines of worker log in debug_info (default 50)
step_jobs_service_account_name  the service account of a ``launcher``-executor run's worker,
                                which creates its steps' Jobs (default: service_account_name)
step_orphan_grace_seconds       a dead, unresumed worker's step Jobs are deleted after this
                                (default 60)
==============================  ===========================================================

Health: a Job's Complete/Failed condition decides SUCCESS/FAILED (exit code and reason from the
pod's terminated container: OOMKilled, DeadlineExceeded, StartError or Error). A container that
cannot start (ImagePullBackOff, ErrImagePull, CreateContainerConfigError...) is FAILED at once:
Kubernetes would keep the pod Pending forever. An Unschedulable pod stays RUNNING with reason
"Unschedulable" and the scheduler's message: the cluster autoscaler may still add a node, and
runherd's start timeout fails the run if it never starts. API errors give UNKNOWN, a missing Job
NOT_FOUND.
"""

from runherd.launchers.kubernetes.config import validate_config
from runherd.launchers.kubernetes.health import health_from
from runherd.launchers.kubernetes.job import build_job, job_name, label_value
from runherd.launchers.kubernetes.launcher import KubernetesLauncher

__all__ = ["KubernetesLauncher", "build_job", "health_from", "job_name", "label_value", "validate_config"]
