// placeholder: replaced by the web build
