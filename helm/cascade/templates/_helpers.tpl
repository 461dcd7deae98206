{{/* One definition per concept, as in the prometheus-community charts. */}}

{{/* Chart name, overridable. */}}
{{- define "cascade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already contains the chart name. */}}
{{- define "cascade.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "cascade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "cascade.labels" -}}
helm.sh/chart: {{ include "cascade.chart" . }}
{{ include "cascade.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cascade
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that identify the release (selectors). */}}
{{- define "cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ranking server's selector: the server pods only, not the job pods. */}}
{{- define "cascade.server.selectorLabels" -}}
{{ include "cascade.selectorLabels" . }}
app.kubernetes.io/component: ranking-server
{{- end }}

{{/* Namespace of an optional object that may live elsewhere (ServiceMonitor, rules, dashboards): (list $ .namespace). */}}
{{- define "cascade.namespace" -}}
{{- $root := index . 0 }}
{{- default $root.Release.Namespace (index . 1) }}
{{- end }}

{{- define "cascade.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cascade.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Container image reference. */}}
{{- define "cascade.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the ConfigMap with the server's serving.yaml, and of the one with the jobs' configs. */}}
{{- define "cascade.server.configMapName" -}}
{{- printf "%s-server" (include "cascade.fullname" .) }}
{{- end }}

{{- define "cascade.jobs.configMapName" -}}
{{- printf "%s-jobs" (include "cascade.fullname" .) }}
{{- end }}

{{/* Number of server processes per pod (config.grpc.processes): each has its own metrics port. */}}
{{- define "cascade.server.processes" -}}
{{- int (dig "grpc" "processes" 1 .Values.server.config) }}
{{- end }}

{{/* Name of the metrics port of server process $i: (list $ i). Process 0 is "metrics". */}}
{{- define "cascade.server.metricsPortName" -}}
{{- $i := int (index . 1) }}
{{- if eq $i 0 }}metrics{{ else }}{{ printf "metrics-%d" $i }}{{ end }}
{{- end }}

{{/*
The serving YAML (serving.config.ServingConfig) mounted at /etc/cascade/serving.yaml: server.config plus
models.allowed_roots = [artifacts.mountPath] unless given. Connection settings come from the environment.
*/}}
{{- define "cascade.server.config" -}}
{{- $cfg := deepCopy .Values.server.config }}
{{- $models := deepCopy (get $cfg "models" | default dict) }}
{{- if not (hasKey $models "allowed_roots") }}
{{- $_ := set $models "allowed_roots" (list .Values.artifacts.mountPath) }}
{{- end }}
{{- $_ := set $cfg "models" $models }}
{{- include "cascade.server.securityConfig" (list . $cfg) }}
{{- toYaml $cfg }}
{{- end }}

{{/*
TLS and SASL settings of the server's three connections, set into its config (list $ $cfg): the files come
from the mounted Secrets (cascade.server.tlsVolumes); credentials come from the environment, never here.
*/}}
{{- define "cascade.server.securityConfig" -}}
{{- $root := index . 0 }}
{{- $cfg := index . 1 }}
{{- $v := $root.Values }}
{{- $grpc := deepCopy (get $cfg "grpc" | default dict) }}
{{- if $v.server.tls.existingSecret }}
{{- $tls := dict "cert_file" "/etc/cascade-tls/grpc/tls.crt" "key_file" "/etc/cascade-tls/grpc/tls.key" }}
{{- if $v.server.tls.clientAuth }}
{{- $_ := set $tls "client_ca_file" "/etc/cascade-tls/grpc/ca.crt" }}
{{- end }}
{{- $_ := set $grpc "tls" $tls }}
{{- else if $v.server.tls.clientAuth }}
{{- fail "server.tls.clientAuth needs server.tls.existingSecret (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if $grpc }}
{{- $_ := set $cfg "grpc" $grpc }}
{{- end }}
{{- $redis := deepCopy (get $cfg "redis" | default dict) }}
{{- $rtls := include "cascade.tlsFiles" (list "redis" $v.redis.tls) | fromYaml }}
{{- if $rtls }}
{{- $_ := set $redis "tls" $rtls }}
{{- $_ := set $cfg "redis" $redis }}
{{- end }}
{{- $kafka := deepCopy (get $cfg "kafka" | default dict) }}
{{- $proto := $v.kafka.securityProtocol }}
{{- if ne $proto "PLAINTEXT" }}
{{- $_ := set $kafka "security_protocol" $proto }}
{{- end }}
{{- if hasPrefix "SASL_" $proto }}
{{- if not $v.kafka.sasl.existingSecret }}
{{- fail (printf "kafka.securityProtocol=%s needs kafka.sasl.existingSecret (a Secret with the SASL username and password)" $proto) }}
{{- end }}
{{- $_ := set $kafka "sasl" (dict "mechanism" $v.kafka.sasl.mechanism) }}
{{- end }}
{{- $ktls := include "cascade.tlsFiles" (list "kafka" $v.kafka.tls) | fromYaml }}
{{- if $ktls }}
{{- if not (hasSuffix "SSL" $proto) }}
{{- fail "kafka.tls is set: kafka.securityProtocol must be SSL or SASL_SSL" }}
{{- end }}
{{- $_ := set $kafka "tls" $ktls }}
{{- end }}
{{- if $kafka }}
{{- $_ := set $cfg "kafka" $kafka }}
{{- end }}
{{- end }}

{{/* A client's TLS files (serving.config.TlsFiles) from its tls values: (list name .tls); "" when not set. */}}
{{- define "cascade.tlsFiles" -}}
{{- $name := index . 0 }}
{{- $t := index . 1 }}
{{- if $t.existingSecret }}
ca_file: {{ printf "/etc/cascade-tls/%s/ca.crt" $name }}
{{- if $t.clientCertificate }}
cert_file: {{ printf "/etc/cascade-tls/%s/tls.crt" $name }}
key_file: {{ printf "/etc/cascade-tls/%s/tls.key" $name }}
{{- end }}
check_hostname: {{ $t.checkHostname }}
{{- else if $t.clientCertificate }}
{{- fail (printf "%s.tls.clientCertificate needs %s.tls.existingSecret (a Secret with tls.crt and tls.key)" $name $name) }}
{{- else if not $t.checkHostname }}
check_hostname: false
{{- end }}
{{- end }}

{{/* The server's TLS Secrets as volumes (read-only, group-readable for the non-root user). */}}
{{- define "cascade.server.tlsVolumes" -}}
{{- range $name, $secret := dict "grpc" .Values.server.tls.existingSecret "redis" .Values.redis.tls.existingSecret "kafka" .Values.kafka.tls.existingSecret }}
{{- if $secret }}
- name: {{ printf "tls-%s" $name }}
  secret:
    secretName: {{ $secret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{- define "cascade.server.tlsVolumeMounts" -}}
{{- range $name, $secret := dict "grpc" .Values.server.tls.existingSecret "redis" .Values.redis.tls.existingSecret "kafka" .Values.kafka.tls.existingSecret }}
{{- if $secret }}
- name: {{ printf "tls-%s" $name }}
  mountPath: {{ printf "/etc/cascade-tls/%s" $name }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* Credentials of the server's connections, from the referenced Secrets (never from values). */}}
{{- define "cascade.env.serverSecrets" -}}
{{- $r := .Values.redis }}
{{- range $var, $key := dict "CASCADE_REDIS_PASSWORD" $r.passwordKey "CASCADE_REDIS_USERNAME" $r.usernameKey }}
{{- if $key }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $r.existingSecret }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- include "cascade.env.kafkaSasl" . }}
{{- end }}

{{/* The Kafka SASL credentials (server and pipeline), from kafka.sasl.existingSecret; nothing without SASL. */}}
{{- define "cascade.env.kafkaSasl" -}}
{{- $k := .Values.kafka }}
{{- if hasPrefix "SASL_" $k.securityProtocol }}
- name: CASCADE_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.usernameKey }}
- name: CASCADE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.passwordKey }}
{{- end }}
{{- end }}

{{/* Name of the headless Service exposing only the metrics ports (the ServiceMonitor's target). */}}
{{- define "cascade.server.metricsServiceName" -}}
{{- printf "%s-metrics" (include "cascade.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Redis URL, read from the referenced Secret (never from values). */}}
{{- define "cascade.env.redis" -}}
- name: CASCADE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.existingSecret is required: a Secret holding the Redis URL" .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
{{- end }}

{{- define "cascade.env.kafka" -}}
- name: CASCADE_KAFKA_BOOTSTRAP
  value: {{ required "kafka.bootstrap is required" .Values.kafka.bootstrap | quote }}
{{- end }}

{{/* Environment of every container: a writable HOME on the read-only root filesystem, then extraEnv. */}}
{{- define "cascade.env.common" -}}
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Name of the artifacts PersistentVolumeClaim. */}}
{{- define "cascade.artifacts.claimName" -}}
{{- default (printf "%s-artifacts" (include "cascade.fullname" .)) .Values.artifacts.persistence.existingClaim }}
{{- end }}

{{/* Volumes every pod has: writable /tmp and the shared artifacts volume. */}}
{{- define "cascade.volumes.common" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: artifacts
{{- if .Values.artifacts.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "cascade.artifacts.claimName" . }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.artifacts.emptyDir.sizeLimit }}
{{- end }}
{{- end }}

{{/* Mounts matching cascade.volumes.common: (list $ readOnlyArtifacts). */}}
{{- define "cascade.volumeMounts.common" -}}
{{- $root := index . 0 -}}
- name: tmp
  mountPath: /tmp
- name: artifacts
  mountPath: {{ $root.Values.artifacts.mountPath }}
  readOnly: {{ index . 1 }}
{{- end }}

{{/*
Where the separate features job writes and the separate trainers read by default: with
pipeline.features.versioned a versioned root (<artifacts>/features: v-<time>-<id>/ versions and the
current.json pointer the trainers pin, features/versions.py), else one directory (<artifacts>/features/current)
that each run replaces.
*/}}
{{- define "cascade.features.default" -}}
{{- ternary "features" "features/current" .Values.pipeline.features.versioned }}
{{- end }}

{{/*
The features job's arguments that say how it writes (list $ out): --versioned --keep-versions N, or
--overwrite. A versioned root must be a mounted path: leases use file locks.
*/}}
{{- define "cascade.features.writeArgs" -}}
{{- $root := index . 0 }}
{{- $job := $root.Values.pipeline.features }}
{{- if $job.versioned }}
{{- if contains "://" (index . 1) }}
{{- fail (printf "pipeline.features.out %s is a URI: a versioned features root (pipeline.features.versioned) must be a mounted path (its leases use file locks); set pipeline.features.versioned=false to write the URI in place, or use the pipeline CronJob (pipeline.run), which builds each version's features in its own directory" (index . 1)) }}
{{- end }}
{{- list "--versioned" "--keep-versions" (toString (int $job.keepVersions)) | toJson }}
{{- else if $job.overwrite }}
{{- list "--overwrite" | toJson }}
{{- else }}
{{- list | toJson }}
{{- end }}
{{- end }}

{{/* A job's default output under the artifacts volume: (list $ value "sub/path"). */}}
{{- define "cascade.jobs.path" -}}
{{- $root := index . 0 }}
{{- default (printf "%s/%s" $root.Values.artifacts.mountPath (index . 2)) (index . 1) }}
{{- end }}

{{/*
One CronJob of the pipeline. Argument: dict with
  root       the chart context ($)
  component  short name (object name suffix and component label)
  job        the job's values (schedule, suspend, backoffLimit, activeDeadlineSeconds, resources)
  command    the container command (list)
  env        extra container env (YAML string, may be empty)
  volumes    extra pod volumes, mounts their container mounts (YAML strings, optional)
  automountToken  mount the service account token (Spark on Kubernetes)
  shm        add a memory-backed /dev/shm (torchrun)
*/}}
{{- define "cascade.cronJob" -}}
{{- $root := .root }}
{{- $job := .job }}
{{- $defaults := $root.Values.pipeline.jobDefaults }}
apiVersion: batch/v1
kind: CronJob
metadata:
  name: {{ include "cascade.cronJobName" (list $root .component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "cascade.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  schedule: {{ $job.schedule | quote }}
  {{- with $defaults.timeZone }}
  timeZone: {{ . | quote }}
  {{- end }}
  suspend: {{ $job.suspend }}
  concurrencyPolicy: {{ $defaults.concurrencyPolicy }}
  startingDeadlineSeconds: {{ $defaults.startingDeadlineSeconds }}
  successfulJobsHistoryLimit: {{ $defaults.successfulJobsHistoryLimit }}
  failedJobsHistoryLimit: {{ $defaults.failedJobsHistoryLimit }}
  jobTemplate:
    metadata:
      labels:
        {{- include "cascade.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
    spec:
      backoffLimit: {{ $job.backoffLimit }}
      activeDeadlineSeconds: {{ $job.activeDeadlineSeconds }}
      ttlSecondsAfterFinished: {{ $defaults.ttlSecondsAfterFinished }}
      template:
        metadata:
          labels:
            {{- include "cascade.labels" $root | nindent 12 }}
            app.kubernetes.io/component: {{ .component }}
          annotations:
            checksum/config: {{ include (print $root.Template.BasePath "/configmap-jobs.yaml") $root | sha256sum }}
            {{- with $defaults.podAnnotations }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
        spec:
          restartPolicy: Never
          serviceAccountName: {{ include "cascade.serviceAccountName" $root }}
          automountServiceAccountToken: {{ .automountToken }}
          {{- with $root.Values.imagePullSecrets }}
          imagePullSecrets:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.podSecurityContext | nindent 12 }}
          containers:
            - name: {{ .component }}
              image: {{ include "cascade.image" $root }}
              imagePullPolicy: {{ $root.Values.image.pullPolicy }}
              workingDir: {{ $root.Values.image.workingDir }}
              command:
                {{- toYaml .command | nindent 16 }}
              env:
                - name: CASCADE_RUN_ID
                  valueFrom:
                    fieldRef:
                      fieldPath: metadata.labels['job-name']
                {{- include "cascade.env.common" $root | nindent 16 }}
                {{- with .env }}
                {{- . | nindent 16 }}
                {{- end }}
              {{- with $root.Values.extraEnvFrom }}
              envFrom:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              {{- with $job.resources }}
              resources:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              securityContext:
                {{- toYaml $root.Values.containerSecurityContext | nindent 16 }}
              volumeMounts:
                {{- include "cascade.volumeMounts.common" (list $root false) | nindent 16 }}
                - name: config
                  mountPath: /etc/cascade
                  readOnly: true
                {{- if .shm }}
                - name: dshm
                  mountPath: /dev/shm
                {{- end }}
                {{- with .mounts }}
                {{- . | nindent 16 }}
                {{- end }}
          volumes:
            {{- include "cascade.volumes.common" $root | nindent 12 }}
            - name: config
              configMap:
                name: {{ include "cascade.jobs.configMapName" $root }}
            {{- if .shm }}
            - name: dshm
              emptyDir:
                medium: Memory
                sizeLimit: {{ $root.Values.pipeline.torchrun.shmSizeLimit }}
            {{- end }}
            {{- with .volumes }}
            {{- . | nindent 12 }}
            {{- end }}
          {{- with $defaults.nodeSelector }}
          nodeSelector:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $defaults.tolerations }}
          tolerations:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $defaults.affinity }}
          affinity:
            {{- toYaml . | nindent 12 }}
          {{- end }}
{{- end }}

{{/*
PromQL label matchers selecting this release's server series. The ServiceMonitor's targets carry the
namespace and service labels (the Prometheus Operator sets them), so rules need no job name.
*/}}
{{- define "cascade.rules.selector" -}}
{{- default (printf "namespace=\"%s\",service=\"%s\"" .Release.Namespace (include "cascade.server.metricsServiceName" .)) .Values.prometheusRule.seriesSelector }}
{{- end }}

{{/* A CronJob's name: (list $ component). Its Jobs are named <this>-<schedule time>. */}}
{{- define "cascade.cronJobName" -}}
{{- printf "%s-%s" (include "cascade.fullname" (index . 0)) (index . 1) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/* The `job` label of the pipeline's pushed outcome metrics (its Pushgateway group). */}}
{{- define "cascade.pipeline.pushJob" -}}
{{- include "cascade.cronJobName" (list . "pipeline") }}
{{- end }}

{{/* PromQL matchers of the pipeline's pushed series (the Pushgateway scraped with honor_labels: true). */}}
{{- define "cascade.rules.pipelineSelector" -}}
{{- default (printf "job=\"%s\",namespace=\"%s\"" (include "cascade.pipeline.pushJob" .) .Release.Namespace) .Values.prometheusRule.pipelineSeriesSelector }}
{{- end }}

{{/* PromQL matchers of kube-state-metrics' series of the pipeline CronJob's Jobs. */}}
{{- define "cascade.rules.pipelineJobSelector" -}}
{{- printf "namespace=\"%s\",job_name=~\"%s-.+\"" .Release.Namespace (include "cascade.cronJobName" (list . "pipeline")) }}
{{- end }}

{{/* Whether Spark runs executors on Kubernetes (the features job then needs its token and, optionally, RBAC). */}}
{{- define "cascade.spark.onKubernetes" -}}
{{- if hasPrefix "k8s://" .Values.pipeline.spark.master }}true{{ end }}
{{- end }}

{{/* A server probe from values with the probe port filled in: (list $ probe). grpc probes need the number. */}}
{{- define "cascade.server.probe" -}}
{{- $root := index . 0 }}
{{- $probe := deepCopy (index . 1) }}
{{- if hasKey $probe "grpc" }}
{{- $_ := set (get $probe "grpc") "port" (int $root.Values.server.ports.probe) }}
{{- end }}
{{- if hasKey $probe "tcpSocket" }}
{{- $_ := set (get $probe "tcpSocket") "port" "probe" }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/* Fails the render when Kubernetes would kill the server before it has drained (serving/app.py stop()). */}}
{{- define "cascade.server.checkGracePeriod" -}}
{{- $grace := float64 (dig "grpc" "shutdown_grace_s" 5.0 .Values.server.config) }}
{{- $needed := addf $grace 11.0 }}
{{- if lt (float64 .Values.server.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "server.terminationGracePeriodSeconds (%v) must be >= server.config.grpc.shutdown_grace_s + 11 = %v: the server drains for the grace period, then waits up to 10 s for the Kafka consumers" .Values.server.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- end }}
