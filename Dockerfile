# hepsub-apiban: HOMER 7 HEPSUB agent that flags APIBAN-listed SIP attackers.
#
#   docker build -t hepsub-apiban .
#   docker run -d --name hepsub-apiban --restart on-failure:5 -v hepsub-state:/var/lib/hepsub-apiban \
#     -p 18088:18088 -p 9061:9060/udp -p 9061:9060/tcp \
#     -e APIBAN_KEY=... -e PUBLIC_IP=... -e HOMER_IP=... -e HOMER_TOKEN=... hepsub-apiban
#
# HEP is 9060 inside the container, published on the host's 9061: heplify-server takes 9060 on the
# HOMER host. A configuration mistake exits 2; on-failure:5 gives up after 5 tries.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY hepsub_apiban/ hepsub_apiban/
COPY config/ config/
# The image's copy of the example file keeps the state on the volume below. Set there, not with
# ENV HEPSUB_STATE_DIR: an environment setting would silently win over the state.dir of a TOML
# mounted over this one. (A mounted TOML without state.dir keeps it in ./state, relative to the
# working directory: /var/lib/hepsub-apiban/state, on the volume too.) grep fails the build if
# the example's line changed and sed missed it.
RUN pip install --no-cache-dir . \
    && mkdir -p /etc/hepsub-apiban \
    && sed 's|^dir = "./state"$|dir = "/var/lib/hepsub-apiban"|' config/hepsub-apiban.toml \
        > /etc/hepsub-apiban/hepsub-apiban.toml \
    && grep -qx 'dir = "/var/lib/hepsub-apiban"' /etc/hepsub-apiban/hepsub-apiban.toml \
    && cd / && rm -rf /src

RUN groupadd --system --gid 10001 hepsub \
    && useradd --system --uid 10001 --gid hepsub --no-create-home --home-dir /var/lib/hepsub-apiban \
        --shell /usr/sbin/nologin hepsub \
    && mkdir -p /var/lib/hepsub-apiban \
    && chown hepsub:hepsub /var/lib/hepsub-apiban

# The uuid registered with HOMER (and the list snapshot) live here; keep it on a volume
# so a restarted container replaces its own HOMER row instead of adding a new one.
VOLUME /var/lib/hepsub-apiban
WORKDIR /var/lib/hepsub-apiban
USER hepsub

# HTTP API (called by homer-app), HEP over UDP and TCP.
EXPOSE 18088 9060/udp 9060/tcp

# GET /healthz on the port the agent listens on: the health command reads agent.bind and
# agent.port from the same file and environment as serve, so a changed port needs no change here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["hepsub-apiban", "health", "--config", "/etc/hepsub-apiban/hepsub-apiban.toml"]

ENTRYPOINT ["hepsub-apiban"]
CMD ["serve", "--config", "/etc/hepsub-apiban/hepsub-apiban.toml"]
