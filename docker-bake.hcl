# Multi-architecture builds of both images with docker buildx bake:
#   docker buildx bake image-local               # both images for this machine, loaded into `docker images`
#   docker buildx bake image-all                 # linux/amd64 + linux/arm64 (Catalyst 9000 and IR1101/IR1800)
#   REGISTRY=ghcr.io/you docker buildx bake image-push
# The publish workflow (.github/workflows/publish.yml) adds tags and labels from docker/metadata-action through
# the meta-api / meta-worker targets.

variable "REGISTRY" {
  default = "ghcr.io/docker-http-passthrough"
}

variable "VERSION" {
  default = "0.1.0"
}

variable "REVISION" {
  default = "unknown"
}

variable "BASE_IMAGE" {
  default = "python:3.11-slim-bookworm"
}

# Tags (and labels) of each image; in the publish workflow docker/metadata-action writes a bake file that
# redefines these two targets (bake-target: meta-api / meta-worker) with the tags of the event.
target "meta-api" {
  tags = ["${REGISTRY}/docker-http-passthrough-api:${VERSION}"]
}

target "meta-worker" {
  tags = ["${REGISTRY}/docker-http-passthrough-worker:${VERSION}"]
}

target "_common" {
  context = "."
  args = {
    BASE_IMAGE = BASE_IMAGE
    VERSION    = VERSION
    REVISION   = REVISION
  }
}

target "api" {
  inherits   = ["_common", "meta-api"]
  dockerfile = "Dockerfile.api"
}

target "worker" {
  inherits   = ["_common", "meta-worker"]
  dockerfile = "Dockerfile.worker"
}

target "api-local" {
  inherits = ["api"]
  tags     = ["docker-http-passthrough-api:latest"]
  output   = ["type=docker"]
}

target "worker-local" {
  inherits = ["worker"]
  tags     = ["docker-http-passthrough-worker:latest"]
  output   = ["type=docker"]
}

target "api-all" {
  inherits  = ["api"]
  platforms = ["linux/amd64", "linux/arm64"]
}

target "worker-all" {
  inherits  = ["worker"]
  platforms = ["linux/amd64", "linux/arm64"]
}

target "api-push" {
  inherits = ["api-all"]
  output   = ["type=registry"]
}

target "worker-push" {
  inherits = ["worker-all"]
  output   = ["type=registry"]
}

group "default" {
  targets = ["image-local"]
}

group "image-local" {
  targets = ["api-local", "worker-local"]
}

group "image-all" {
  targets = ["api-all", "worker-all"]
}

group "image-push" {
  targets = ["api-push", "worker-push"]
}
