{{/* Names: <release>-routenlp, cut to 63 characters (a DNS label). */}}
{{- define "routenlp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "routenlp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "routenlp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "routenlp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "routenlp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The operator pods' selector labels as k=v,k=v (`--operator-pod-labels`: its NetworkPolicy peer). */}}
{{- define "routenlp.operatorPodLabels" -}}
{{- $pairs := list -}}
{{- range $k, $v := (include "routenlp.selectorLabels" . | fromYaml) -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," (sortAlpha $pairs) -}}
{{- end -}}

{{- define "routenlp.labels" -}}
helm.sh/chart: {{ include "routenlp.chart" . }}
{{ include "routenlp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: routenlp
{{- end -}}

{{- define "routenlp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "routenlp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "routenlp.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the operator watches when namespaced (default: the release namespace). */}}
{{- define "routenlp.watchNamespaces" -}}
{{- $ns := .Values.operator.watchNamespaces -}}
{{- if not $ns -}}{{- $ns = list .Release.Namespace -}}{{- end -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{- define "routenlp.webhookServiceName" -}}
{{- printf "%s-webhook" (include "routenlp.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "routenlp.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "routenlp.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "routenlp.webhookCertName" -}}
{{- printf "%s-webhook" (include "routenlp.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Arguments of `routenlp operator` (flags defined in routenlp/operator/main.py; tests/chart checks each exists). */}}
{{- define "routenlp.operatorArgs" -}}
- --liveness=http://0.0.0.0:{{ .Values.healthPort }}/healthz
- --log-format={{ .Values.operator.logFormat }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
- --resync-seconds={{ .Values.operator.resyncSeconds }}
- --metrics-port={{ if .Values.metrics.enabled }}{{ .Values.metrics.port }}{{ else }}0{{ end }}
{{- if eq .Values.operator.scope "cluster" }}
- --all-namespaces
{{- else }}
{{- range (include "routenlp.watchNamespaces" . | fromJsonArray) }}
- --namespace={{ . }}
{{- end }}
{{- end }}
{{- if .Values.networkPolicy.enabled }}
- --network-policies
- --operator-pod-labels={{ include "routenlp.operatorPodLabels" . }}
{{- with .Values.networkPolicy.monitoringNamespace }}
- --monitoring-namespace={{ . }}
{{- end }}
{{- else }}
- --no-network-policies
{{- end }}
{{- if .Values.operator.peering.enabled }}
- --peering={{ .Values.operator.peering.name }}
- --priority={{ .Values.operator.peering.priority }}
{{- end }}
{{- if .Values.webhook.enabled }}
- --webhook-port={{ .Values.webhook.port }}
- --webhook-cert=/etc/routenlp/webhook/tls.crt
- --webhook-key=/etc/routenlp/webhook/tls.key
{{- end }}
{{- with .Values.operator.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}
