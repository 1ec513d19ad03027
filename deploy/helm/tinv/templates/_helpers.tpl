{{- define "tinv.name" -}}tinv{{- end -}}

{{- define "tinv.fullname" -}}
{{- if contains "tinv" .Release.Name -}}{{ .Release.Name | trunc 53 | trimSuffix "-" }}{{- else -}}{{ printf "%s-tinv" .Release.Name | trunc 53 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "tinv.labels" -}}
app.kubernetes.io/name: tinv
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tinv.selectorLabels" -}}
app.kubernetes.io/name: tinv
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "tinv.namespaces" -}}
{{- if .Values.watchNamespaces -}}{{ join "," .Values.watchNamespaces }}{{- else -}}{{ .Release.Namespace }}{{- end -}}
{{- end -}}

{{- define "tinv.operatorImage" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tinv.trainerImage" -}}
{{ .Values.trainer.image.repository }}:{{ .Values.trainer.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tinv.storageSecret" -}}
{{ .Values.operatorStorageCredentialsSecret | default .Values.defaults.storage.credentialsSecret }}
{{- end -}}

{{/* The operator's permissions: exactly what its handlers use (tested), nothing on Secrets. */}}
{{- define "tinv.rules" -}}
- apiGroups: ["tinv.io"]
  resources: ["textualinversionjobs", "generationgrids"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["tinv.io"]
  resources: ["textualinversionjobs/status", "generationgrids/status"]
  verbs: ["get", "patch"]
# blockOwnerDeletion on child objects needs this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: ["tinv.io"]
  resources: ["textualinversionjobs/finalizers", "generationgrids/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- /* operator (issue 14, item 9): before creating a GPU Job the operator checks that the default
     credentials Secret exists, by a PartialObjectMetadata GET (metadata only, never its data). `get`
     is limited to that one Secret name, whose keys the operator already holds itself
     (operatorStorageCredentialsSecret defaults to it); no other Secret can be read. */}}
{{- with .Values.defaults.storage.credentialsSecret }}
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: [{{ . | quote }}]
  verbs: ["get"]
{{- end }}
# leader election of the replicas (operator/leader.py)
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "patch"]
{{- end -}}
