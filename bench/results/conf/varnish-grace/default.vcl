vcl 4.1;

backend default {
	.host = "127.0.0.1";
	.port = "19080";
}

sub vcl_backend_response {
	set beresp.ttl = 50ms;
	set beresp.grace = 1s;
}
