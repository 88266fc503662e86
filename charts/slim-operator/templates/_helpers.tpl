{{- define "slim-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slim-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "slim-operator.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "slim-operator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "slim-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "slim-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "slim-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slim-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slim-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "slim-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "slim-operator.webhookService" -}}
{{- printf "%s-webhook" (include "slim-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slim-operator.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "slim-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slim-operator.selfManagedCerts" -}}
{{- if and .Values.webhook.enabled (eq .Values.webhook.certMode "self-managed") }}true{{ end }}
{{- end }}
