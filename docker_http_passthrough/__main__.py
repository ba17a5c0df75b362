from docker_http_passthrough.cli import main

main()
