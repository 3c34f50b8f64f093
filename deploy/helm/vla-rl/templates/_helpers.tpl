{{- define "vla-rl.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "vla-rl.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "vla-rl.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "vla-rl.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "vla-rl.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "vla-rl.fullname" .)) -}}
{{- end -}}

{{/* host:port of pod i of a component's StatefulSet behind its headless Service */}}
{{- define "vla-rl.podAddress" -}}
{{- $name := printf "%s-%s" (include "vla-rl.fullname" .root) .component -}}
{{- printf "%s-%d.%s.%s.svc:50051" $name .index $name .root.Release.Namespace -}}
{{- end -}}

{{- define "vla-rl.redisUrl" -}}
{{- .Values.redis.externalUrl | default (printf "redis://%s-redis.%s.svc:6379/0" (include "vla-rl.fullname" .) .Release.Namespace) -}}
{{- end -}}

{{- define "vla-rl.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "vla-rl.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Credentials as files (never environment values, never command lines) */}}
{{- define "vla-rl.authEnv" -}}
- name: VLA_RL_TOKEN_FILE
  value: /secrets/token
- name: VLA_RL_REDIS_PASSWORD_FILE
  value: /secrets/redis-password
- name: VLA_RL_HEALTH_TARGET
  value: 127.0.0.1:50051
{{- end -}}

{{- define "vla-rl.volumeMounts" -}}
- name: config
  mountPath: /config
  readOnly: true
- name: auth
  mountPath: /secrets
  readOnly: true
- name: runs
  mountPath: /runs
- name: models
  mountPath: /models
  readOnly: true
{{- end -}}

{{- define "vla-rl.volumes" -}}
- name: config
  configMap:
    name: {{ include "vla-rl.fullname" . }}-config
- name: auth
  secret:
    secretName: {{ include "vla-rl.secretName" . }}
    defaultMode: 0440
- name: runs
  {{- if .Values.runs.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.runs.existingClaim }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: models
  {{- if .Values.models.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.models.existingClaim }}
    readOnly: true
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end -}}

{{/* The tiny random checkpoint, written into /runs before a service loads it */}}
{{- define "vla-rl.tinyModelInit" -}}
{{- if .Values.tinyModel }}
initContainers:
  - name: tiny-model
    image: {{ include "vla-rl.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: ["tiny-checkpoint", "/runs/tiny_model", "--seed", "{{ .Values.config.runner.seed | default 0 }}"]
    securityContext:
      {{- include "vla-rl.containerSecurity" . | nindent 6 }}
    resources:
      requests: {cpu: 100m, memory: 512Mi}
      limits: {memory: 2Gi}
    volumeMounts:
      - name: runs
        mountPath: /runs
{{- end }}
{{- end -}}

{{- define "vla-rl.grpcProbes" -}}
startupProbe:
  grpc: {port: 50051}
  periodSeconds: 10
  failureThreshold: {{ .startup }}
readinessProbe:
  grpc: {port: 50051}
  periodSeconds: 10
livenessProbe:
  grpc: {port: 50051}
  periodSeconds: 20
  failureThreshold: 6
{{- end -}}

{{- define "vla-rl.gpuResources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($res.limits | default dict)) -}}
{{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) ($res.requests | default dict)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
