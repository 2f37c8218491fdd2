{{- define "tuneforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tuneforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "mlflow") */}}
{{- define "tuneforge.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A tuneforge image by name: REGISTRY/tuneforge-NAME:TAG, as images/build.sh tags it. */}}
{{- define "tuneforge.image" -}}
{{- printf "%s/tuneforge-%s:%s" .root.Values.images.registry .name (.root.Values.images.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "tuneforge.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else -}}
{{- printf "http://%s-seaweedfs.%s.svc:8333" (include "tuneforge.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- define "tuneforge.s3SecretName" -}}
{{- .Values.s3.existingSecret | default .Values.s3.secretName -}}
{{- end -}}

{{- define "tuneforge.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "tuneforge.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- else -}}
{{- .Values.mlflow.externalUri -}}
{{- end -}}
{{- end -}}

{{/* "true" when the chart's MLflow asks for users and passwords, else "". */}}
{{- define "tuneforge.mlflowAuth" -}}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled -}}true{{- end -}}
{{- end -}}

{{/* The Secret with the generated MLflow passwords and the server's CSRF key. */}}
{{- define "tuneforge.mlflowAuthSecretName" -}}
{{- printf "%s-mlflow-auth" (include "tuneforge.fullname" .) -}}
{{- end -}}

{{- define "tuneforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "tuneforge.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Values that fit the schema but not each other fail here, at install time. */}}
{{- define "tuneforge.validate" -}}
{{- $sqlite := and (not .Values.mlflow.backendStore.postgresUri) (not .Values.mlflow.backendStore.existingSecret) -}}
{{- if and .Values.mlflow.enabled $sqlite (gt (int .Values.mlflow.replicas) 1) -}}
{{- fail "mlflow.replicas > 1 needs mlflow.backendStore.postgresUri or .existingSecret: SQLite lives on one ReadWriteOnce volume" -}}
{{- end -}}
{{- if and (not .Values.seaweedfs.enabled) (not .Values.s3.endpoint) -}}
{{- fail "s3.endpoint is required when seaweedfs.enabled is false" -}}
{{- end -}}
{{- if and (not .Values.mlflow.enabled) (not .Values.mlflow.externalUri) -}}
{{- fail "mlflow.externalUri is required when mlflow.enabled is false" -}}
{{- end -}}
{{- if include "tuneforge.mlflowAuth" . -}}
{{- $users := list "admin" .Values.mlflow.auth.pipelineUser .Values.mlflow.auth.approverUser -}}
{{- if ne (len ($users | uniq)) 3 -}}
{{- fail (printf "mlflow.auth.pipelineUser %q and .approverUser %q must be two users, neither of them admin (MLflow's administrator): one identity for both would let the pipeline promote what it registers" .Values.mlflow.auth.pipelineUser .Values.mlflow.auth.approverUser) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.serving.enabled (not .Values.serving.modelUri) -}}
{{- fail "serving.modelUri is required when serving.enabled is true: the s3:// URI of a registered version's GGUF file (tuneforge deploy NAME --target llamacpp prints it)" -}}
{{- end -}}
{{- if and .Values.schedule.enabled (not (hasKey .Values.runConfigs .Values.schedule.config)) -}}
{{- fail (printf "schedule.config %q is not a key of runConfigs (keys: %s)" .Values.schedule.config (keys .Values.runConfigs | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
