# A small image that runs the gateway as a non-root user.
# The build stage has gcc: setup.py compiles the hot path with mypyc (the same CPython 3.11 as
# the runtime stage, so the extensions load there).
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
RUN find gateway -name '*.so' -delete && pip install --no-cache-dir --prefix=/install . \
 && python -c "import sys; sys.path.insert(0, '/install/lib/python3.11/site-packages'); \
import gateway._compiled as c; assert c.compiled_modules(), 'hot path not compiled'"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /app gateway
COPY --from=build /install /usr/local
WORKDIR /app
COPY config ./config
# development certificates so the embedded default config (HTTPS on 8443) starts as is; mount
# your own config and certificates over /app/config and /app/certs for anything real
RUN gateway certs init --out /app/certs --hosts localhost,127.0.0.1 > /dev/null \
 && chown -R gateway /app/certs
USER gateway
EXPOSE 8080 8443 9901
ENV GATEWAY_CONFIG=/app/config/gateway.yaml
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run"]
