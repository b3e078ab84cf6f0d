# A small image that runs the gateway as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /app gateway
COPY --from=build /install /usr/local
WORKDIR /app
COPY config ./config
USER gateway
EXPOSE 8080 8443 9901
ENV GATEWAY_CONFIG=/app/config/gateway.yaml
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run"]
