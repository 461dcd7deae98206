{{/*
The alert rule groups of the PrometheusRule (a Prometheus rule-file `groups:` list, so tests run promtool
on exactly this). Series are selected by cascade.rules.selector; every aggregation keeps namespace and
service so one Prometheus can watch several releases. Metric names: serving/metrics.py METRIC_NAMES; the
pipeline group: jobs/pipeline.py PIPELINE_METRIC_NAMES (pushed) and kube-state-metrics' kube_job_status_*.
*/}}
{{- define "cascade.rules.groups" -}}
{{- range $group := list "serving" "streaming" "pipeline" }}
{{- $rules := include (printf "cascade.rules.%s" $group) $ | trim }}
{{- if $rules }}
- name: cascade-{{ $group }}
  rules:
    {{- $rules | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The rules of the cascade-serving group (request path and model/Redis state). */}}
{{- define "cascade.rules.serving" -}}
{{- $a := .Values.prometheusRule.alerts }}
{{- $sel := include "cascade.rules.selector" . }}
{{- $by := "namespace, service" -}}
{{- with $a.latency }}
{{- if .enabled }}
- alert: CascadeRankLatencyHigh
  expr: |-
    histogram_quantile(0.99, sum by ({{ $by }}, le) (rate(cascade_rank_stage_seconds_bucket{ {{- $sel }},stage="total"}[5m])))
      > {{ .p99Seconds }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: Cascade Rank p99 latency is over its budget of {{ .p99Seconds }} s
    description: {{ `p99 of the whole Rank handler in {{ $labels.namespace }}/{{ $labels.service }} is {{ $value | humanizeDuration }}.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.errorRate }}
{{- if .enabled }}
- alert: CascadeRankErrorRateHigh
  expr: |-
    sum by ({{ $by }}) (rate(cascade_rank_requests_total{ {{- $sel }},status=~"{{ join "|" .codes }}"}[5m]))
      / sum by ({{ $by }}) (rate(cascade_rank_requests_total{ {{- $sel }}}[5m]))
      > {{ .ratio }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: Cascade requests are failing (status {{ join ", " .codes }})
    description: {{ `{{ $value | humanizePercentage }} of the requests to {{ $labels.namespace }}/{{ $labels.service }} fail with a server-side status.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.shedRate }}
{{- if .enabled }}
- alert: CascadeRequestsShed
  expr: |-
    sum by ({{ $by }}) (rate(cascade_requests_shed_total{ {{- $sel }}}[5m]))
      / sum by ({{ $by }}) (rate(cascade_rank_requests_total{ {{- $sel }},method="Rank"}[5m]))
      > {{ .ratio }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: Cascade is shedding load (RESOURCE_EXHAUSTED)
    description: {{ `{{ $value | humanizePercentage }} of Rank requests to {{ $labels.namespace }}/{{ $labels.service }} are rejected because grpc.max_in_flight calls are already accepted (running or queued): add replicas or processes.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.degradedAnswers }}
{{- if .enabled }}
- alert: CascadeDegradedAnswers
  expr: |-
    sum by ({{ $by }}) (rate(cascade_degraded_answers_total{ {{- $sel }}{{ with .ignoreReasons }},reason!~"{{ join "|" . }}"{{ end }}}[5m]))
      / sum by ({{ $by }}) (rate(cascade_rank_requests_total{ {{- $sel }},method="Rank",status="OK"}[5m]))
      > {{ .ratio }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: Many Cascade answers are fallbacks
    description: {{ `{{ $value | humanizePercentage }} of Rank answers from {{ $labels.namespace }}/{{ $labels.service }} are degraded (popularity or retrieval fallbacks); see cascade_degraded_answers_total by reason.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.modelAge }}
{{- if .enabled }}
- alert: CascadeModelStale
  expr: |-
    time() - cascade_model_loaded_timestamp_seconds{ {{- $sel }}} > {{ .maxAgeSeconds }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: A Cascade server has served the same model for too long (or has none)
    description: {{ `{{ $labels.pod }} swapped in its model {{ $value | humanizeDuration }} ago (a server with no model reports the Unix epoch): check the pipeline CronJob and the models topic.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.redisDown }}
{{- if .enabled }}
- alert: CascadeRedisDown
  expr: |-
    min by ({{ $by }}, pod) (cascade_redis_up{ {{- $sel }}}) == 0
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: A Cascade server cannot reach Redis
    description: {{ `{{ $labels.pod }} fails its Redis health probe: it answers from the in-memory popularity list and reports NOT_SERVING.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The rules of the cascade-streaming group (Kafka consumers -> Redis). */}}
{{- define "cascade.rules.streaming" -}}
{{- $a := .Values.prometheusRule.alerts }}
{{- $sel := include "cascade.rules.selector" . }}
{{- $by := "namespace, service" -}}
{{- with $a.consumerLag }}
{{- if .enabled }}
- alert: CascadeConsumerLagHigh
  expr: |-
    sum by ({{ $by }}, topic) (max by ({{ $by }}, topic, partition) (cascade_consumer_lag{ {{- $sel }}}))
      > {{ .messages }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: {{ `Cascade consumers are falling behind on {{ $labels.topic }}` | quote }}
    description: {{ `The servers of {{ $labels.namespace }}/{{ $labels.service }} are {{ $value | humanize }} messages behind on {{ $labels.topic }}.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.eventFreshness }}
{{- if .enabled }}
- alert: CascadeEventsStale
  expr: |-
    histogram_quantile(0.99, sum by ({{ $by }}, le) (rate(cascade_event_freshness_seconds_bucket{ {{- $sel }}}[5m])))
      > {{ .p99Seconds }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: Events take too long to reach the online state
    description: {{ `p99 from event produced to visible in Redis is {{ $value | humanizeDuration }} in {{ $labels.namespace }}/{{ $labels.service }}.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.consumerRestarts }}
{{- if .enabled }}
- alert: CascadeConsumerRestarting
  expr: |-
    sum by ({{ $by }}, consumer) (rate(cascade_consumer_restarts_total{ {{- $sel }}}[5m])) * 60
      > {{ .perMinute }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: {{ `The Cascade {{ $labels.consumer }} consumer keeps failing and retrying` | quote }}
    description: {{ `The {{ $labels.consumer }} consumers of {{ $labels.namespace }}/{{ $labels.service }} hit {{ $value | humanize }} unexpected errors a minute; each is retried with backoff and a record that keeps failing is skipped: see the server logs.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.skippedRecords }}
{{- if .enabled }}
- alert: CascadeRecordsSkipped
  expr: |-
    sum by ({{ $by }}, topic) (increase(cascade_consumer_skipped_records_total{ {{- $sel }}}[{{ .window }}])) > 0
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: {{ `Cascade skipped records of {{ $labels.topic }} that kept failing` | quote }}
    description: {{ `{{ $value | humanize }} records of {{ $labels.topic }} were dead-lettered (reason consumer_error) and skipped by {{ $labels.namespace }}/{{ $labels.service }}: their effect is missing from the state until they are fixed and re-sent.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The rules of the cascade-pipeline group (the pipeline CronJob: its pushed outcome, its Jobs). */}}
{{- define "cascade.rules.pipeline" -}}
{{- if .Values.pipeline.run.enabled }}
{{- $a := .Values.prometheusRule.alerts }}
{{- $sel := include "cascade.rules.pipelineSelector" . }}
{{- $jobSel := include "cascade.rules.pipelineJobSelector" . }}
{{- $pushed := .Values.pipeline.run.pushgateway }}
{{- $by := "namespace, job" -}}
{{- with $a.pipeline }}
{{- if and .enabled $pushed }}
- alert: CascadePipelineFailed
  expr: |-
    max by ({{ $by }}) (cascade_pipeline_last_outcome{ {{- $sel }},outcome="failed"}) == 1
      or max by ({{ $by }}) (time() - cascade_pipeline_last_success_timestamp_seconds{ {{- $sel }}}) > {{ mulf .maxSuccessAgeHours 3600 }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: The Cascade pipeline failed, or has not succeeded for {{ .maxSuccessAgeHours }} hours
    description: {{ `The last run of {{ $labels.job }} in {{ $labels.namespace }} failed, or no run has ended without failing for too long, so no new model is trained: see the failed Job's pod logs and cascade pipeline status (the failed stage and its error are in the version's manifest.json; a re-run resumes at that stage).` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.gateRefused }}
{{- if and .enabled $pushed }}
- alert: CascadeGateRefused
  expr: |-
    max by ({{ $by }}) (cascade_pipeline_gate_refused{ {{- $sel }}}) == 1
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: The Cascade evaluation gate refused the new model; it was not published
    description: {{ `The last run of {{ $labels.job }} in {{ $labels.namespace }} trained a candidate that regressed on a gated metric, so the servers keep the published model: the reasons are in the version's evaluation.json (and the run's log). Publish a fixed run, or promote a version by hand with cascade pipeline promote.` | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with $a.pipelineJobFailed }}
{{- if .enabled }}
- alert: CascadePipelineJobFailed
  expr: |-
    max by (namespace, job_name) (kube_job_status_failed{ {{- $jobSel }}}) > 0
      and on (namespace, job_name) max by (namespace, job_name) (kube_job_status_active{ {{- $jobSel }}}) == 0
      and on (namespace, job_name) max by (namespace, job_name) (kube_job_status_succeeded{ {{- $jobSel }}}) == 0
      and on (namespace, job_name) max by (namespace, job_name) (time() - kube_job_status_start_time{ {{- $jobSel }}}) < {{ mulf .windowHours 3600 }}
    {{- if $pushed }}
      unless on (namespace) max by (namespace) (cascade_pipeline_gate_refused{ {{- $sel }}}) == 1
    {{- end }}
  for: {{ .for }}
  labels:
    {{- include "cascade.rules.labels" (list $ .severity) | nindent 4 }}
  annotations:
    summary: {{ `The Cascade pipeline Job {{ $labels.job_name }} failed` | quote }}
    {{- $gate := ternary "" ", or its gate refused the model: exit code 3" (not (empty $pushed)) }}
    description: {{ printf `Every pod of the Job {{ $labels.namespace }}/{{ $labels.job_name }} failed (crashed, killed, out of memory or past its deadline%s): see kubectl -n {{ $labels.namespace }} describe job {{ $labels.job_name }} and its pods' logs.` $gate | quote }}
    {{- with $.Values.prometheusRule.additionalAlertAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every alert: (list $ severity). */}}
{{- define "cascade.rules.labels" -}}
{{- $root := index . 0 -}}
severity: {{ index . 1 }}
{{- with $root.Values.prometheusRule.additionalAlertLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}
