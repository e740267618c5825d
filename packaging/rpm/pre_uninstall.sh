# nbd-s3 %preun: on final removal stop (SIGTERM flushes every export) and disable.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now nbd-s3.service >/dev/null 2>&1 || :
fi
