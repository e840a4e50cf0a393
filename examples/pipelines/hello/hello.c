#include <stdio.h>
#include <string.h>

/* Prints a greeting; `hello NAME` greets NAME. */
int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "world";
    if (strlen(name) == 0) {
        fprintf(stderr, "empty name\n");
        return 2;
    }
    printf("hello, %s\n", name);
    return 0;
}
