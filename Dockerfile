# lstm-serve on CPU: `docker build -t lstm-stream .` (the CUDA variant: Dockerfile.cuda).
# The embedded default model is served unless LSTM_MODEL (or --model) names a mounted file.
# The build stage compiles the hot path (Cython) into the wheel; the runtime stage
# gets the wheel only, no compiler.
FROM python:3.11-slim AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY model_export ./model_export
COPY service ./service
COPY lstm_stream ./lstm_stream
COPY lstm_bench ./lstm_bench
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/lstm-stream lstm \
    && mkdir -p /var/lib/lstm-stream/data && chown lstm /var/lib/lstm-stream/data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /var/lib/lstm-stream
ENV LSTM_HOST=0.0.0.0 \
    LSTM_METRICS_HOST=0.0.0.0 \
    LSTM_PORT=50051 \
    LSTM_METRICS_PORT=9464 \
    LSTM_DEVICE=cpu
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["lstm-serve"]
