# syntax=docker/dockerfile:1
#
# A model image: a runtime image of the service (Dockerfile, target cpu or gpu) with one bundle baked
# in at /models/default, for Kubernetes (deploy/k8s/), where a new bundle version is a new image tag
# that rolls out like any other change. The build context is the bundle directory itself:
#
#   docker build -f deploy/model.Dockerfile --build-arg SERVICE_IMAGE=encoder-service:cpu \
#       -t REGISTRY/encoder-model:cpu-default-1 bundles/default
ARG SERVICE_IMAGE=encoder-service:cpu
FROM ${SERVICE_IMAGE}
# Owned by root and read-only to the service's user: the service never writes to its bundle.
COPY . /models/default/
