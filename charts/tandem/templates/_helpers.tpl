{{/* The chart name, or nameOverride. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, or the release name (with the chart name
appended unless it already contains it). Cut to 47 characters so "-controller-leader" etc. fit.
*/}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include "tandem.selectorLabels" (list . "controller") */}}
{{- define "tandem.selectorLabels" -}}
{{- $root := index . 0 }}
app.kubernetes.io/name: {{ include "tandem.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Labels of one component's objects. */}}
{{- define "tandem.componentLabels" -}}
{{ include "tandem.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The image reference. */}}
{{- define "tandem.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "tandem.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "tandem.fullname" .)) .Values.controller.serviceAccount.name }}
{{- end }}

{{- define "tandem.agentServiceAccount" -}}
{{- default (printf "%s-agent" (include "tandem.fullname" .)) .Values.agent.serviceAccount.name }}
{{- end }}

{{/* Fails rendering on values that cannot work. */}}
{{- define "tandem.validate" -}}
{{- if lt (int .Values.controller.replicas) 0 }}
{{- fail "controller.replicas must be 0 or more" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled (the ServiceMonitor scrapes that Service)" }}
{{- end }}
{{- range .Values.agent.extraHostPaths }}
{{- if not (hasPrefix "/" .) }}
{{- fail (printf "agent.extraHostPaths: %q is not an absolute path" .) }}
{{- end }}
{{- end }}
{{- if not (hasPrefix "/" .Values.agent.stateDir) }}
{{- fail "agent.stateDir must be an absolute path" }}
{{- end }}
{{- if not (hasPrefix "/" .Values.agent.kubeletDir) }}
{{- fail "agent.kubeletDir must be an absolute path" }}
{{- end }}
{{- end }}
