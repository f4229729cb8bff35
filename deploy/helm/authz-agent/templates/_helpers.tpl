{{- define "authz-agent.labels" -}}
app.kubernetes.io/name: authz-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "authz-agent.selector" -}}
app.kubernetes.io/name: authz-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
