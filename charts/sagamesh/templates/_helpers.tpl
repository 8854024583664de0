{{/* Chart name, release-scoped full name and common labels. */}}
{{- define "sagamesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sagamesh.operatorName" -}}{{ include "sagamesh.fullname" . }}-operator{{- end -}}
{{- define "sagamesh.webhookName" -}}{{ include "sagamesh.fullname" . }}-injector{{- end -}}
{{- define "sagamesh.webhookSecret" -}}{{ include "sagamesh.fullname" . }}-injector-tls{{- end -}}

{{- define "sagamesh.labels" -}}
app.kubernetes.io/name: sagamesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sagamesh.operatorSelector" -}}
app.kubernetes.io/name: sagamesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "sagamesh.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "sagamesh.sidecarImage" -}}
{{ .Values.sidecar.image.repository }}:{{ .Values.sidecar.image.tag | default .Chart.AppVersion }}
{{- end -}}
